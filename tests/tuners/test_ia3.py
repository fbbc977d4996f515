"""(IA)^3 through the shared method checks (llama, bert, GPT-2 Conv1D), plus its own promises:
HF PEFT's default targets and feed-forward modules, which side each vector scales, merge/unmerge."""

import peft
import pytest
import torch

import peftx
from peftx.tuners.ia3 import IA3Config, IA3Linear
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_ia3_keeps_the_method_promises(kind, tmp_path):
    model, inputs, task = make(kind)
    pm = mc.check_identity_at_init(model, inputs, IA3Config(task_type=task))
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path)
    mc.check_merge_matches(pm, inputs)
    mc.check_trainable_params_equal_hf(model, IA3Config(task_type=task), peft.IA3Config(task_type=task))
    mc.check_hf_round_trip(model, inputs, IA3Config(task_type=task), peft.IA3Config(task_type=task), tmp_path)


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_default_targets_and_sides_equal_hf(kind):
    model, _, task = make(kind)
    ours = peftx.get_peft_model(twin(model), IA3Config(task_type=task))
    theirs = peft.get_peft_model(twin(model), peft.IA3Config(task_type=task))
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters() if "ia3_l" in n}
    assert shapes == {n: tuple(p.shape) for n, p in theirs.named_parameters() if "ia3_l" in n}
    ff = {n for n, m in ours.named_modules() if isinstance(m, IA3Linear) and m.is_feedforward}
    assert ff == {n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)}
    assert ff, "the architecture's feed-forward modules were not found"
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


def test_llama_defaults_scale_keys_values_and_down_proj_input():
    model, _, task = make("llama")
    pm = peftx.get_peft_model(model, IA3Config(task_type=task))
    layer = pm.base_model.model.model.layers[0]
    assert not layer.self_attn.k_proj.is_feedforward and layer.self_attn.k_proj.ia3_l["default"].shape == (16, 1)
    assert not layer.self_attn.v_proj.is_feedforward
    assert layer.mlp.down_proj.is_feedforward and layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)
    assert not isinstance(layer.self_attn.q_proj, IA3Linear)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_scales_the_promised_side(feedforward, conv1d):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    base = Conv1D(7, 5) if conv1d else torch.nn.Linear(5, 7)
    with torch.no_grad():
        base.bias.normal_()
    layer = IA3Linear(twin(base), is_feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l["default"].uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 5)
    v = layer.ia3_l["default"].view(-1)
    want = base(x * v) if feedforward else base(x) * v
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
    layer.merge()
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, base.bias, atol=1e-6, rtol=1e-6)


def test_two_active_adapters_multiply_and_disable_gives_the_base():
    model, inputs, task = make("llama")
    ref = logits(model, inputs)
    pm = peftx.get_peft_model(twin(model), IA3Config(task_type=task))
    pm.add_adapter("other", IA3Config(task_type=task))
    mc.randomize_adapter(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        layer.ia3_l["other"].fill_(2.0)
    pm.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) * layer.ia3_l["default"].view(-1) * 2.0)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, inputs), ref, atol=0, rtol=0)
    torch.testing.assert_close(logits(pm.unload(), inputs), ref, atol=0, rtol=0)


def test_explicit_targets_and_regex_feedforward_equal_hf(tmp_path):
    model, inputs, task = make("llama")
    kw = dict(task_type=task, target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=r".*\.up_proj")
    mc.check_trainable_params_equal_hf(model, IA3Config(**kw), peft.IA3Config(**kw))
    mc.check_hf_round_trip(model, inputs, IA3Config(**kw), peft.IA3Config(**kw), tmp_path)
    pm = peftx.get_peft_model(twin(model), IA3Config(**kw))
    assert pm.base_model.model.model.layers[0].mlp.up_proj.is_feedforward
    assert not pm.base_model.model.model.layers[0].mlp.down_proj.is_feedforward


def test_bad_configs_name_what_to_change():
    with pytest.raises(ValueError, match="feedforward_modules must be a subset"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="yes")
    model, _, task = make("llama")
    with pytest.raises(ValueError, match="not supported by"):
        peftx.get_peft_model(model, IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))


def test_layer_trains_on_every_device(device):
    torch.manual_seed(0)
    for feedforward in (False, True):
        layer = IA3Linear(torch.nn.Linear(6, 4).to(device), is_feedforward=feedforward)
        x = torch.randn(5, 6, device=device)
        layer(x).square().sum().backward()
        assert layer.ia3_l["default"].grad is not None and layer.ia3_l["default"].grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None
