"""transformers Trainer with peftx models (PeftxTrainer): adapter-only checkpoints, exact resume (same
losses and weights as an uninterrupted run, LoRA dropout included), a custom optimizer and scheduler,
dataset columns and label names from the base model, best-model loading, and bad checkpoints."""

import os

import pytest
import torch
from safetensors.torch import load_file

import peftx
from peftx.integrations import PeftxTrainer
from tests.integration.tiny_models import make

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("isolated_rng")

STEPS = 6


class TokenData(torch.utils.data.Dataset):
    """Fixed random token sequences; each item also carries a column the model does not take."""

    def __init__(self, n=12, seq=9, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 100, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "source_row": i}


class RecordingTrainer(PeftxTrainer):
    """Records every training loss exactly (the logs round them)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            loss = out[0] if isinstance(out, tuple) else out
            self.losses.append(loss.item())
        return out


def peft_model(kind="lora", r=8, seed=0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj")):
    model, _, _ = make("llama", seed=seed)
    if kind == "qlora":
        model = peftx.quantize_model(model, compute_dtype=torch.float32)
    torch.manual_seed(seed)
    return peftx.get_peft_model(model.train(), peftx.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=16,
                                                                lora_dropout=dropout, target_modules=list(targets)))


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=5e-3,
                save_steps=3, logging_steps=1, report_to=[], disable_tqdm=True, use_cpu=True, seed=7,
                dataloader_num_workers=0, save_only_model=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def trainer(model, out, optimizers=(None, None), eval_dataset=None, **kw):
    t = RecordingTrainer(model=model, args=args(out, **kw), train_dataset=TokenData(), eval_dataset=eval_dataset,
                         optimizers=optimizers)
    t.losses = []
    return t


def adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_checkpoints_hold_only_the_adapter(tmp_path, kind):
    model = peft_model(kind)
    t = trainer(model, tmp_path)
    t.train()
    ckpt = tmp_path / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    tensors = load_file(ckpt / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)
    assert len(tensors) == 2 * 3 * 2  # A and B for three targets in two layers
    # The file is the adapter alone: a few KiB, not the base model.
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 64 * 1024
    t.save_model(str(tmp_path / "final"))
    base, _, _ = make("llama", seed=0)
    if kind == "qlora":
        base = peftx.quantize_model(base, compute_dtype=torch.float32)
    loaded = peftx.PeftModel.from_pretrained(base, tmp_path / "final")
    for n, p in adapter(model).items():
        assert torch.equal(dict(loaded.named_parameters())[n], p), n


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_resume_continues_exactly(tmp_path, kind):
    full = trainer(peft_model(kind), tmp_path / "full")
    full.train()
    assert len(full.losses) == STEPS
    # A new process would build the same model from scratch; a different seed shows the adapter comes
    # from the checkpoint (and the dropout RNG from the Trainer's saved RNG state).
    resumed_model = peft_model(kind, seed=0)
    with torch.no_grad():
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    resumed = trainer(resumed_model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.losses == full.losses[3:]
    ours, theirs = adapter(resumed_model), adapter(full.model)
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), n


def test_custom_optimizer_and_scheduler(tmp_path):
    model = peft_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    lrs = [0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    t = trainer(model, tmp_path, optimizers=(opt, sched))
    t.train()
    assert t.optimizer.optimizer is opt if hasattr(t.optimizer, "optimizer") else t.optimizer is opt
    assert all("momentum_buffer" in opt.state[p] for p in params)
    logged = [h["learning_rate"] for h in t.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx(lrs)
    # Resuming with a new optimizer of the same kind restores its state and the schedule.
    model2 = peft_model()
    params2 = [p for p in model2.parameters() if p.requires_grad]
    opt2 = torch.optim.SGD(params2, lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 0.5 ** step)
    t2 = trainer(model2, tmp_path / "resumed", optimizers=(opt2, sched2))
    t2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert t2.losses == t.losses[3:]
    for n, p in adapter(model2).items():
        assert torch.equal(p, adapter(model)[n]), n


def test_columns_labels_and_eval_loss_follow_the_base_model(tmp_path):
    t = trainer(peft_model(), tmp_path, eval_dataset=TokenData(n=4, seed=3), eval_strategy="steps", eval_steps=3)
    assert t.label_names == ["labels"]
    t._set_signature_columns_if_needed()
    assert {"input_ids", "labels", "attention_mask"} <= set(t._signature_columns)
    assert "source_row" not in t._signature_columns  # dropped by the collator, as for HF models
    t.train()
    evals = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and all(e > 0 for e in evals)


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    model = peft_model()
    t = trainer(model, tmp_path, eval_dataset=TokenData(n=4, seed=3), eval_strategy="steps", eval_steps=3,
                load_best_model_at_end=True, metric_for_best_model="eval_loss",
                learning_rate=0.5)  # a large step: the eval losses move a lot
    t.train()
    losses = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
    assert t.state.best_model_checkpoint.endswith("checkpoint-3") and losses[0] < losses[1], losses
    best = load_file(os.path.join(t.state.best_model_checkpoint, "adapter_model.safetensors"))
    current = model.get_adapter_state_dict("default")
    assert best.keys() == current.keys() and len(current) > 0
    for k, v in current.items():
        assert torch.equal(v, best[k]), k


def test_label_smoothing_shifts_labels_for_causal_lms(tmp_path):
    model = peft_model(dropout=0.0)
    t = trainer(model, tmp_path, label_smoothing_factor=0.1, max_steps=1)
    batch = {k: torch.stack([TokenData()[i][k] for i in range(2)]) for k in ("input_ids", "labels")}
    model.eval()
    loss = t.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_resume_from_another_adapter_layout_is_a_clear_error(tmp_path):
    trainer(peft_model(r=8), tmp_path / "r8").train()
    ckpt = str(tmp_path / "r8" / "checkpoint-3")
    with pytest.raises(ValueError, match=r"another layout.*r: checkpoint 8, model 4"):
        trainer(peft_model(r=4), tmp_path / "r4").train(resume_from_checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"target_modules: checkpoint \['down_proj', 'q_proj', 'v_proj'\]"):
        trainer(peft_model(targets=("q_proj", "v_proj")), tmp_path / "qv").train(resume_from_checkpoint=ckpt)
    # The same targets in another order are the same layout.
    reordered = trainer(peft_model(targets=("v_proj", "down_proj", "q_proj")), tmp_path / "reordered")
    reordered.train(resume_from_checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"lora_dropout: checkpoint 0.1, model 0.0"):
        trainer(peft_model(dropout=0.0), tmp_path / "d0").train(resume_from_checkpoint=ckpt)


def test_resume_from_a_whole_model_checkpoint_is_a_clear_error(tmp_path):
    # What a plain transformers.Trainer writes for a peftx model: the whole state dict, no adapter files.
    model = peft_model()
    plain = transformers.Trainer(model=model, args=args(tmp_path / "plain", remove_unused_columns=False),
                                 train_dataset=[{k: v for k, v in TokenData()[i].items() if k != "source_row"}
                                                for i in range(12)])
    plain.train()
    ckpt = tmp_path / "plain" / "checkpoint-3"
    assert (ckpt / "model.safetensors").exists() and not (ckpt / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="whole-model checkpoint"):
        trainer(peft_model(), tmp_path / "x").train(resume_from_checkpoint=str(ckpt))
