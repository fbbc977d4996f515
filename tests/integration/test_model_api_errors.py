"""Bad input to the model-level API gets a clear error, and nothing the user had on disk is lost."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import peftx
import peftx.save_load as save_load
from tests.integration.tiny_models import logits, make, twin


def test_targets_matching_nothing_list_close_names():
    model, _, task = make("llama")
    with pytest.raises(ValueError, match=r"matched no module.*close names: \['q_proj',"):
        peftx.get_peft_model(model, peftx.LoraConfig(task_type=task, target_modules=["q_prj"]))


def test_unknown_architecture_without_targets():
    with pytest.raises(ValueError, match="no default for model_type None"):
        peftx.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), peftx.LoraConfig())
    # With explicit targets a plain module works.
    pm = peftx.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), peftx.LoraConfig(target_modules=["0"]))
    assert isinstance(pm.base_model.model[0], peftx.LoraLinear)


def test_unsupported_target_type():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="LayerNorm is not supported"):
        peftx.get_peft_model(model, peftx.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("name", ["lora", "lora_x", "", "a.b", "modules_to_save"])
def test_adapter_name_collisions(name):
    model, _, task = make("llama")
    with pytest.raises(ValueError, match="adapter_name"):
        peftx.get_peft_model(model, peftx.LoraConfig(task_type=task), adapter_name=name)


def test_adapter_for_another_architecture_names_tensor_and_shapes(tmp_path):
    small, _, task = make("llama")
    pm = peftx.get_peft_model(small, peftx.LoraConfig(task_type=task, r=4))
    pm.save_pretrained(tmp_path)
    import transformers as tf
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*shape \(4, 32\).*shape \(4, 64\)"):
        peftx.PeftModel.from_pretrained(other, tmp_path)
    gpt2, _, _ = make("gpt2")
    with pytest.raises(ValueError, match="matched no module|no place in this model"):
        peftx.PeftModel.from_pretrained(gpt2, tmp_path)


def test_missing_truncated_and_pickled_files(tmp_path):
    model, _, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, r=4))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="does not load.*unpickle"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path)


def test_incomplete_adapter_file(tmp_path):
    model, _, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, r=4))
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path)


def test_unknown_peft_type_and_unknown_keys(tmp_path):
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, r=4, init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, some_future_option=3, use_fancy=True)))
    with pytest.warns(UserWarning, match=r"ignoring keys.*some_future_option"):
        loaded = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), logits(pm.eval(), inputs))
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="NOT_A_METHOD")))
    with pytest.raises(ValueError, match="unknown peft_type 'NOT_A_METHOD'"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path)


def test_crash_mid_save_leaves_previous_files(tmp_path, monkeypatch):
    model, _, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, r=4))
    pm.save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in ("adapter_model.safetensors", "adapter_config.json")}

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(save_load, "save_file", crash)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(tmp_path)
    after = {n: (tmp_path / n).read_bytes() for n in before}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_inference_mode_loading_freezes_and_trainable_loading_does_not(tmp_path):
    model, _, task = make("llama")
    peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, r=4)).save_pretrained(tmp_path)
    frozen = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    live = peftx.PeftModel.from_pretrained(twin(model), tmp_path, is_trainable=True)
    assert live.get_nb_trainable_parameters()[0] > 0


def test_auto_peft_model_loads_base_from_local_path(tmp_path):
    model, inputs, task = make("llama")
    model.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pm = peftx.get_peft_model(base, peftx.LoraConfig(task_type=task, r=4, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = peftx.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, peftx.PeftModelForCausalLM)
    torch.testing.assert_close(logits(loaded, inputs), logits(pm.eval(), inputs))


def test_meta_device_model_counts_without_allocating():
    import transformers as tf
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                                                   num_hidden_layers=4, num_attention_heads=4))
    pm = peftx.get_peft_model(model, peftx.LoraConfig(task_type="CAUSAL_LM", r=8))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 4 * 2 * 8 * (256 + 256)
    assert all(p.device.type == "meta" for p in pm.parameters())
