"""The model-level API against the real HF PEFT package: same trainable-parameter counts, and adapters
that move both ways (HF PEFT -> peftx and peftx -> HF PEFT) with the same logits (fp32, atol 1e-5)."""

import contextlib
import io
import json
import os

import pytest
import torch

import peftx
from tests.integration.tiny_models import logits, make, twin

peft = pytest.importorskip("peft")

KINDS = ["llama", "gpt2", "bert", "mistral", "qwen2", "roberta", "t5", "mt5"]


def printed(fn):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue().strip()


def hf_config(task, **kw):
    return peft.LoraConfig(task_type=task, **kw)


def ours_config(task, **kw):
    return peftx.LoraConfig(task_type=task, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kw", [dict(r=4), dict(r=8, target_modules="all-linear"),
                                dict(r=2, lora_alpha=16, bias="all")])
def test_trainable_parameter_counts_match_hf(kind, kw):
    model, _, task = make(kind)
    if kind == "gpt2" and kw.get("target_modules") == "all-linear":
        pass
    theirs = peft.get_peft_model(twin(model), hf_config(task, **kw))
    ours = peftx.get_peft_model(twin(model), ours_config(task, **kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert printed(ours.print_trainable_parameters) == printed(theirs.print_trainable_parameters)


def test_bert_base_sized_count_wording():
    # The example: bert-base sequence classification, r=8 on query/key/value (built on meta).
    import transformers as tf
    with torch.device("meta"):
        model = tf.BertForSequenceClassification(tf.BertConfig())
    ours = peftx.get_peft_model(model, peftx.LoraConfig(task_type="SEQ_CLS", r=8,
                                                        target_modules=["query", "key", "value"]))
    assert printed(ours.print_trainable_parameters) == \
        "trainable params: 443,906 || all params: 109,927,684 || trainable%: 0.4038"


def _randomized_hf(kind, **kw):
    model, inputs, task = make(kind)
    hf = peft.get_peft_model(twin(model), hf_config(task, init_lora_weights=False, **kw))
    return model, inputs, task, hf


@pytest.mark.parametrize("kind", KINDS)
def test_hf_adapter_loads_in_peftx_with_same_logits(kind, tmp_path):
    model, inputs, task, hf = _randomized_hf(kind, r=4, lora_alpha=8)
    hf.save_pretrained(tmp_path)
    ours = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    assert type(ours).__name__ == type(hf).__name__  # task subclass chosen from the config
    want = logits(hf.eval(), inputs)
    torch.testing.assert_close(logits(ours, inputs), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, logits(model, inputs), atol=1e-4)  # the adapter really changes the output


@pytest.mark.parametrize("kind", KINDS)
def test_peftx_adapter_loads_in_hf_with_same_logits(kind, tmp_path):
    model, inputs, task = make(kind)
    ours = peftx.get_peft_model(twin(model), ours_config(task, r=4, lora_alpha=8, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["inference_mode"] is True
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path)
    want = logits(ours.eval(), inputs)
    torch.testing.assert_close(logits(hf, inputs), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, logits(model, inputs), atol=1e-4)


def test_saved_keys_equal_hf(tmp_path):
    from safetensors.torch import load_file
    model, inputs, task = make("bert")
    hf = peft.get_peft_model(twin(model), hf_config(task, r=4, bias="all"))
    ours = peftx.get_peft_model(twin(model), ours_config(task, r=4, bias="all"))
    hf.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    a = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_classifier_head_and_second_adapter_round_trip_both_ways(tmp_path):
    model, inputs, task = make("bert")
    ours = peftx.get_peft_model(twin(model), ours_config(task, r=4, init_lora_weights=False))
    ours.add_adapter("other", ours_config(task, r=2, init_lora_weights=False, target_modules=["key"]))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path)
    hf.load_adapter(tmp_path / "other", "other")
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    back.load_adapter(tmp_path / "other", "other")
    for name in ("default", "other"):
        ours.set_adapter(name)
        hf.set_adapter(name)
        back.set_adapter(name)
        want = logits(ours.eval(), inputs)
        torch.testing.assert_close(logits(hf.eval(), inputs), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(back, inputs), want, atol=1e-5, rtol=1e-5)


def test_mixed_batch_adapter_names_match_hf(tmp_path):
    model, inputs, task, hf = _randomized_hf("llama", r=4)
    hf.add_adapter("b", hf_config(task, r=2, init_lora_weights=False))
    hf.save_pretrained(tmp_path)
    ours = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    ours.load_adapter(tmp_path / "b", "b")
    names = ["b", "__base__"]
    with torch.no_grad():
        want = hf.eval()(**inputs, adapter_names=names).logits
        got = ours(**inputs, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_hf(combination, tmp_path):
    model, inputs, task, hf = _randomized_hf("llama", r=4, lora_alpha=8)
    hf.add_adapter("b", hf_config(task, r=4, lora_alpha=4, init_lora_weights=False))
    hf.save_pretrained(tmp_path)
    ours = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    ours.load_adapter(tmp_path / "b", "b")
    hf.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination)
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination)
    hf.set_adapter("mix")
    ours.set_adapter("mix")
    torch.testing.assert_close(logits(ours.eval(), inputs), logits(hf.eval(), inputs), atol=1e-4, rtol=1e-4)


def test_merge_and_unload_unload_disable(tmp_path):
    model, inputs, task = make("llama")
    base_logits = logits(model, inputs)
    ours = peftx.get_peft_model(twin(model), ours_config(task, r=4, init_lora_weights=False))
    adapted = logits(ours.eval(), inputs)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, inputs), base_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, inputs), adapted, atol=0, rtol=0)
    merged = twin(ours).merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, inputs), adapted, atol=1e-5, rtol=1e-5)
    plain = ours.unload()
    torch.testing.assert_close(logits(plain, inputs), base_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_round_trip_both_ways(bias, tmp_path):
    model, inputs, task = make("bert")
    ours = peftx.get_peft_model(twin(model), ours_config(task, r=4, init_lora_weights=False, bias=bias))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path / "ours")
    want = logits(ours.eval(), inputs)
    torch.testing.assert_close(logits(hf, inputs), want, atol=1e-5, rtol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "hf")
    torch.testing.assert_close(logits(back, inputs), want, atol=1e-5, rtol=1e-5)


def test_training_trajectory_equals_hf_peft():
    # Same model, same adapter init (seeded), same optimizer: the fused kernels give HF PEFT's losses.
    model, inputs, task = make("llama")
    ids = inputs["input_ids"]
    curves = []
    for lib in (peftx, peft):
        torch.manual_seed(0)
        pm = lib.get_peft_model(twin(model), lib.LoraConfig(task_type=task, r=8, lora_alpha=16,
                                                            target_modules="all-linear"))
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(15):
            loss = pm(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), atol=1e-4, rtol=1e-5)
    assert curves[0][-1] < curves[0][0] - 0.3


@pytest.mark.parametrize("kw", [
    dict(r=4, rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6}, alpha_pattern={"v_proj": 3}),
    dict(r=4, target_modules=r".*layers\.0\.self_attn\.(q|k)_proj"),
    dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1]),
    dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(r=4, target_modules="all-linear", exclude_modules=["o_proj", "up_proj"]),
    dict(r=3, use_rslora=True, lora_alpha=7),
])
def test_config_options_match_hf(kw, tmp_path):
    model, inputs, task = make("llama")
    theirs = peft.get_peft_model(twin(model), hf_config(task, init_lora_weights=False, **kw))
    ours = peftx.get_peft_model(twin(model), ours_config(task, init_lora_weights=False, **kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.save_pretrained(tmp_path)
    loaded = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs.eval(), inputs), atol=1e-5, rtol=1e-5)


def test_generate_passthrough_matches_hf(tmp_path):
    model, inputs, task, hf = _randomized_hf("llama", r=4)
    hf.save_pretrained(tmp_path)
    ours = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=inputs["input_ids"], **kw),
                       hf.eval().generate(input_ids=inputs["input_ids"], **kw))


def test_add_set_delete_adapter_model_level():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), ours_config(task, r=4, init_lora_weights=False))
    first = logits(pm.eval(), inputs)
    pm.add_adapter("second", ours_config(task, r=2, init_lora_weights=False))
    torch.testing.assert_close(logits(pm, inputs), first)  # adding does not activate
    pm.set_adapter("second")
    second = logits(pm, inputs)
    assert not torch.allclose(first, second)
    assert all("second" in n for n, p in pm.named_parameters() if p.requires_grad)
    pm.delete_adapter("second")
    assert pm.active_adapter == "default" and "second" not in pm.peft_config
    assert not any("second" in n for n, _ in pm.named_parameters())
    torch.testing.assert_close(logits(pm, inputs), first)
    with pytest.raises(ValueError, match="unknown adapter 'second'"):
        pm.set_adapter("second")
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("default", ours_config(task))


def test_embedding_and_lm_head_targets_match_hf(tmp_path):
    # Embedding LoRA (lora_embedding_A/B) and a tied output layer: files move both ways.
    model, inputs, task = make("gpt2")
    kw = dict(r=4, target_modules=["wte", "c_attn"], init_lora_weights=False)
    hf = peft.get_peft_model(twin(model), hf_config(task, **kw))
    ours = peftx.get_peft_model(twin(model), ours_config(task, **kw))
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    wte = ours.base_model.model.transformer.wte
    assert isinstance(wte, peftx.LoraEmbedding) and wte.weight is wte.base_layer.weight
    hf.save_pretrained(tmp_path / "hf")
    loaded = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "hf")
    torch.testing.assert_close(logits(loaded, inputs), logits(hf.eval(), inputs), atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(twin(model), tmp_path / "ours")
    torch.testing.assert_close(logits(back, inputs), logits(hf, inputs), atol=1e-5, rtol=1e-5)
