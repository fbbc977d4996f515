"""Prompt tuning, P-tuning, prefix tuning and multitask prompt tuning through the shared method
checks and the prompt-specific ones, on tiny llama/gpt2 (causal LM), bert (sequence classification)
and t5 (seq2seq) models, against the installed HF PEFT."""

import peft
import pytest
import torch

import peftx
from tests.integration.tiny_models import make, twin
from tests.tuners import method_checks as mc
from tests.tuners import prompt_checks as pc

METHODS = {
    "prompt_tuning": ("PromptTuningConfig", {}),
    "p_tuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "p_tuning_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 16}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_projection": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 16}),
    "multitask": ("MultitaskPromptTuningConfig", {"num_tasks": 2, "num_ranks": 2}),
}
KINDS = ["llama", "gpt2", "bert", "t5"]


def configs(method, task, num_virtual_tokens=3):
    name, extra = METHODS[method]
    kw = dict(task_type=task, num_virtual_tokens=num_virtual_tokens, **extra)
    return getattr(peftx, name)(**kw), getattr(peft, name)(**kw)


def task_kwargs(method, batch=2):
    return {"task_ids": torch.arange(batch) % 2} if method == "multitask" else {}


@pytest.fixture(autouse=True)
def _quiet(recwarn):
    """HF PEFT warns about position ids and config keys; peftx about HF-only config keys."""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_prompt_method_keeps_the_promises(method, kind, tmp_path):
    model, inputs, task = make(kind)
    inputs = {**inputs, **task_kwargs(method)}
    ours, theirs = configs(method, task)
    torch.manual_seed(0)
    pm = peftx.get_peft_model(twin(model), ours)
    assert type(pm.base_model) is type(model) and "default" in pm.prompt_encoder
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path)
    mc.check_trainable_params_equal_hf(model, *configs(method, task))
    if kind == "t5" and method == "multitask":
        return  # HF PEFT's seq2seq multitask forward fails when decoder_input_ids are given (it concatenates None)
    pc.check_forward_matches_hf(model, inputs, *configs(method, task), tmp_path)


def make_for_generation(kind):
    """The tiny models of tiny_models.py; for t5 and gpt2 ones whose greedy output depends on the input (their
    default init makes the tiny models repeat one token whatever they see)."""
    import transformers as tf
    if kind == "gpt2":  # the default init makes the tiny gpt2 repeat one token too
        torch.manual_seed(0)
        cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3)
        return tf.GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(3, 100, (2, 9))}, "CAUSAL_LM"
    if kind != "t5":
        return make(kind)
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, initializer_factor=3.0)
    return tf.T5ForConditionalGeneration(cfg).eval(), {"input_ids": torch.randint(3, 100, (2, 9))}, "SEQ_2_SEQ_LM"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("method", list(METHODS))
def test_generate_matches_hf_both_ways(method, kind, tmp_path):
    model, inputs, task = make_for_generation(kind)
    model.generation_config.pad_token_id = 0
    pc.check_generate_matches_hf(model, inputs["input_ids"], *configs(method, task), tmp_path, **task_kwargs(method))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_left_padded_generate_equals_rows_alone(method, kind):
    model, _, task = make_for_generation(kind)
    torch.manual_seed(1)
    pm = peftx.get_peft_model(twin(model), configs(method, task)[0]).eval()
    mc.randomize_adapter(pm, seed=5)
    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(2))
    pc.check_left_padded_generate(pm, ids, task_ids=task_kwargs(method, 3).get("task_ids"))


def test_print_trainable_parameters_equals_hf(capsys):
    model, _, task = make("bert")
    for method in METHODS:
        ours, theirs = configs(method, task)
        peftx.get_peft_model(twin(model), ours).print_trainable_parameters()
        mine = capsys.readouterr().out
        peft.get_peft_model(twin(model), theirs).print_trainable_parameters()
        assert mine == capsys.readouterr().out, method


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "multitask"])
def test_causal_lm_loss_equals_hf(method, tmp_path):
    model, inputs, task = make("llama")
    ours, _ = configs(method, task)
    pm = peftx.get_peft_model(twin(model), ours).eval()
    mc.randomize_adapter(pm)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path).eval()
    kw = {**inputs, "labels": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"]),
          **task_kwargs(method)}
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).loss, hf(**kw).loss)


def test_disable_adapter_gives_the_base_model():
    model, inputs, task = make("bert")
    for method in ("prompt_tuning", "prefix"):
        pm = peftx.get_peft_model(twin(model), configs(method, task)[0]).eval()
        mc.randomize_adapter(pm)
        with torch.no_grad():
            with pm.disable_adapter():
                off = pm(**inputs).logits
            on = pm(**inputs).logits
        torch.testing.assert_close(off, mc.logits(model, inputs), atol=0, rtol=0)
        assert not torch.allclose(on, off)


def test_several_adapters_switch_and_delete():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=3))
    pm.add_adapter("other", peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=5))
    pm.eval()
    first = mc.logits(pm, inputs)
    pm.set_adapter("other")
    second = mc.logits(pm, inputs)
    assert first.shape[1] == 12 and second.shape[1] == 14
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("other", peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=2))
    with pytest.raises(ValueError, match="of type PREFIX_TUNING cannot be added"):
        pm.add_adapter("p", peftx.PrefixTuningConfig(task_type=task, num_virtual_tokens=2))
    pm.delete_adapter("other")
    assert pm.active_adapter == "default" and list(pm.prompt_encoder) == ["default"]
    torch.testing.assert_close(mc.logits(pm, inputs), first, atol=0, rtol=0)


def test_token_classification_prepends_ignored_labels(tmp_path):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=4)
    model = tf.BertForTokenClassification(cfg).eval()
    ids = torch.randint(3, 100, (2, 7))
    pm = peftx.get_peft_model(twin(model), peftx.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3))
    labels = torch.randint(0, 4, (2, 7))
    out = pm(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 10, 4)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 3:].reshape(-1, 4), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path).eval()
    pm.eval()
    torch.testing.assert_close(mc.logits(hf, {"input_ids": ids}), mc.logits(pm, {"input_ids": ids}))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "p_tuning_mlp"])
def test_bf16_model_with_fp32_prompts_trains_and_generates(method):
    model, inputs, task = make("llama")
    model = model.to(torch.bfloat16)
    pm = peftx.get_peft_model(model, configs(method, task)[0])
    assert all(p.dtype == torch.float32 for p in pm.prompt_encoder.parameters())
    out = pm(**inputs, labels=inputs["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.prompt_encoder.parameters())
    pm.eval()
    assert pm.generate(**inputs, max_new_tokens=3, do_sample=False).shape == (2, 12)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_inputs_embeds_equal_input_ids(method):
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, configs(method, task)[0]).eval()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(mc.logits(pm, {"inputs_embeds": embeds}), mc.logits(pm, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "p_tuning_lstm"])
def test_seq2seq_loss_equals_hf(method, tmp_path):
    model, inputs, task = make("t5")
    pm = peftx.get_peft_model(twin(model), configs(method, task)[0]).eval()
    mc.randomize_adapter(pm)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path).eval()
    kw = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"]),
          "labels": inputs["decoder_input_ids"].clone()}  # a contiguous copy: T5 views the labels
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).loss, hf(**kw).loss)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "multitask"])
def test_beam_search_and_several_sequences_per_row(method, tmp_path):
    model, inputs, task = make("llama")
    model.generation_config.pad_token_id = 0
    ours, _ = configs(method, task)
    pm = peftx.get_peft_model(twin(model), ours).eval()
    mc.randomize_adapter(pm)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path).eval()
    kw = dict(input_ids=inputs["input_ids"], max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False,
              **task_kwargs(method))
    out = pm.generate(**kw)
    assert out.shape == (4, 13)
    assert torch.equal(out, hf.generate(**kw))
    # each row's two sequences are the ones it gets alone
    alone = pm.generate(**{**kw, "input_ids": inputs["input_ids"][1:],
                           **{k: v[1:] for k, v in task_kwargs(method).items()}})
    assert torch.equal(out[2:], alone)
