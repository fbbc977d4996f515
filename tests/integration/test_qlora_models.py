"""QLoRA models: quantize_model, conversion of bitsandbytes-quantized layers, prepare_model_for_kbit_training,
4-bit parameter counts equal to HF PEFT over bitsandbytes, and a QLoRA model that trains."""

import contextlib
import io

import pytest
import torch
from torch import nn

import peftx
from tests.integration.tiny_models import logits, make, twin

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def bnb_quantize(model, skip=("lm_head",)):
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and not any(name.endswith(s) for s in skip):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            if m.bias is not None:
                q.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
            q = q.to("cpu")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def printed(fn):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue().strip()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_4bit_parameter_counts_match_hf_over_bitsandbytes(kind):
    model, _, task = make(kind)
    skip = ("lm_head", "classifier")  # HF PEFT cannot copy a 4-bit head into modules_to_save
    theirs = peft.get_peft_model(bnb_quantize(twin(model), skip), peft.LoraConfig(task_type=task, r=4))
    ours = peftx.get_peft_model(peftx.quantize_model(twin(model), compute_dtype=torch.float32, skip_modules=skip),
                                peftx.LoraConfig(task_type=task, r=4))
    assert isinstance(ours.base_model.model.get_submodule(
        next(n for n, m in ours.named_modules() if isinstance(m, peftx.LoraLinear4bit)).removeprefix(
            "base_model.model.")), peftx.LoraLinear4bit)
    assert printed(ours.print_trainable_parameters) == printed(theirs.print_trainable_parameters)


def test_bitsandbytes_quantized_model_converts_byte_for_byte():
    # The converted layers hold bitsandbytes' bytes; they equal peftx's own quantization of the same
    # weights, so the logits are those of quantize_model on the original model. (bitsandbytes 0.50's own
    # CPU forward of these layers decodes the double-quantized absmax wrongly, so it is not the reference.)
    model, inputs, _ = make("llama")
    ref = bnb_quantize(twin(model)).model.layers[0].self_attn.q_proj
    ours = peftx.quantize_model(bnb_quantize(twin(model)))
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peftx.Linear4bit)
    assert torch.equal(layer.weight.packed.reshape(-1), ref.weight.data.reshape(-1))
    direct = peftx.quantize_model(twin(model), compute_dtype=torch.float32)
    assert torch.equal(direct.model.layers[0].self_attn.q_proj.weight.packed, layer.weight.packed)
    torch.testing.assert_close(logits(ours, inputs), logits(direct, inputs), atol=1e-6, rtol=1e-6)


def test_quantize_model_skips_and_errors():
    model, inputs, _ = make("llama")
    q = peftx.quantize_model(twin(model), compute_dtype=torch.float32)
    assert type(q.lm_head) is nn.Linear  # skipped by default
    assert isinstance(q.model.layers[1].mlp.down_proj, peftx.Linear4bit)
    # NF4 error is small relative to the logits' spread.
    diff = (logits(q, inputs) - logits(model, inputs)).abs().mean() / logits(model, inputs).std()
    assert diff < 0.2
    with pytest.raises(ValueError, match="has no nn.Linear layer"):
        peftx.quantize_model(nn.Sequential(nn.ReLU()))


def test_prepare_model_for_kbit_training_as_hf():
    model, inputs, _ = make("llama")
    model = model.to(torch.bfloat16)
    q = peftx.quantize_model(model)
    prepared = peftx.prepare_model_for_kbit_training(q)
    params = dict(prepared.named_parameters())
    assert all(not p.requires_grad for p in params.values())
    assert params["model.norm.weight"].dtype == torch.float32
    assert params["model.embed_tokens.weight"].dtype == torch.float32
    assert prepared.is_gradient_checkpointing


def test_qlora_model_trains():
    torch.manual_seed(0)
    model, inputs, _ = make("llama")
    q = peftx.prepare_model_for_kbit_training(peftx.quantize_model(model, compute_dtype=torch.float32),
                                              use_gradient_checkpointing=False)
    pm = peftx.get_peft_model(q, peftx.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules="all-linear"))
    pm.train()
    trainable = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs["input_ids"]
    losses = []
    for _ in range(30):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # (The tiny model's loss on random tokens levels off near 4.2 from log(128) = 4.85, with HF PEFT too.)
    assert losses[-1] < losses[0] - 0.4 and losses[-1] < min(losses[:5]), losses
    unchanged = [n for n, p in pm.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])]
    assert not unchanged, unchanged
