"""BitFit (peftx only: HF PEFT has no BitFit, so there is no HF round trip): only biases train, the
output is the base model's at init, files hold only the biases, and models without biases refuse."""

import json

import pytest
import torch
from safetensors.torch import load_file

import peftx
from peftx.tuners.bitfit import BitFitConfig, BitFitLayer
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc


def _bias_count(model, skip=("classifier",)):
    return sum(m.bias.numel() for n, m in model.named_modules()
               if isinstance(getattr(m, "bias", None), torch.nn.Parameter) and not any(s in n for s in skip))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_bitfit_keeps_the_method_promises(kind, tmp_path):
    model, inputs, task = make(kind)
    pm = mc.check_identity_at_init(model, inputs, BitFitConfig(task_type=task))
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path)
    mc.check_merge_matches(pm, inputs, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_only_biases_train_and_files_hold_only_biases(kind, tmp_path):
    model, inputs, task = make(kind)
    pm = peftx.get_peft_model(twin(model), BitFitConfig(task_type=task))
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    head = [n for n in trainable if ".modules_to_save." in n]
    assert all(n.endswith(".bitfit_bias.default") for n in trainable if n not in head)
    assert bool(head) == (kind == "bert")  # the classification head trains whole (modules_to_save)
    n_trainable, n_all = pm.get_nb_trainable_parameters()
    head_numel = sum(trainable[n].numel() for n in head)
    assert n_trainable - head_numel == _bias_count(model)
    pm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.endswith(".bitfit_bias") or ".classifier." in k for k in keys), sorted(keys)[:5]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BITFIT"


def test_target_modules_restrict_which_biases_train():
    model, inputs, task = make("bert")
    pm = peftx.get_peft_model(twin(model), BitFitConfig(task_type=task, target_modules=["query", "value"]))
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, BitFitLayer)]
    assert len(wrapped) == 4 and all(n.endswith(("query", "value")) for n in wrapped)
    pm = peftx.get_peft_model(twin(model), BitFitConfig(task_type=task, target_modules=r".*layer\.0\..*",
                                                        exclude_modules=["LayerNorm"]))
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, BitFitLayer)]
    assert wrapped and all(".layer.0." in n and "LayerNorm" not in n for n in wrapped)


def test_llama_has_no_biases_and_refuses():
    model, _, task = make("llama")
    with pytest.raises(ValueError, match="BitFit has nothing to train"):
        peftx.get_peft_model(model, BitFitConfig(task_type=task))
    with pytest.raises(ValueError, match="BitFit has nothing to train"):
        peftx.get_peft_model(model, BitFitConfig(task_type=task, target_modules=["q_proj"]))


def test_disable_unload_and_two_adapters():
    model, inputs, task = make("gpt2")
    ref = logits(model, inputs)
    pm = peftx.get_peft_model(twin(model), BitFitConfig(task_type=task))
    mc.randomize_adapter(pm, seed=0)
    pm.add_adapter("other", BitFitConfig(task_type=task))
    assert not torch.allclose(logits(pm, inputs), ref)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, inputs), ref, atol=0, rtol=0)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.bitfit_bias["other"].add_(1.0)
    pm.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 32)
    want = x @ layer.base_layer.weight + layer.bitfit_bias["default"] + 1.0
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(pm.unload(), inputs), ref, atol=0, rtol=0)


def test_merge_then_unmerge_restores_the_bias_exactly():
    model, inputs, task = make("bert")
    pm = peftx.get_peft_model(twin(model), BitFitConfig(task_type=task))
    mc.randomize_adapter(pm)
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    before = layer.base_layer.bias.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.bias, layer.bitfit_bias["default"])
    layer.unmerge()
    assert torch.equal(layer.base_layer.bias, before)


def test_bitfit_config_rejects_bad_target_types():
    with pytest.raises(ValueError, match="target_modules"):
        BitFitConfig(target_modules=3)


def test_layer_trains_on_every_device(device):
    torch.manual_seed(0)
    for base in (torch.nn.Linear(6, 4), torch.nn.LayerNorm(6)):
        layer = BitFitLayer(base.to(device))
        x = torch.randn(5, 6, device=device)
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
        layer(x).square().sum().backward()
        assert layer.bitfit_bias["default"].grad.abs().sum() > 0
        assert base.bias.grad is None and base.weight.grad is None
