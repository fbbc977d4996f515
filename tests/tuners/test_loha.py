"""LoHa: the method promises on a tiny Llama and a small conv model, layer outputs and gradients equal
to HF PEFT's LoHa layers with the same factors, training-time dropouts drawn as HF PEFT draws them,
the factor-only autograd functions against plain autograd, and errors."""

import copy

import peft
import pytest
import torch
from peft.tuners.loha import layer as hf_loha
from torch import nn

import peftx
from peftx.tuners.loha.functional import (hada_weight, hada_weight_cp, hada_weight_cp_ref, hada_weight_ref, loha_linear,
                                         loha_linear_ref)
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc
from tests.tuners.lycoris_helpers import CONV_TARGETS, copy_factors, factor_grads, hf_twin, make_base, make_conv

pytestmark = pytest.mark.usefixtures("isolated_rng")

# bf16 base, fp32 factors: the base product is bf16 on both sides, rounded once to bf16 at the end.
LAYER_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _model(kind):
    if kind == "llama":
        model, inputs, task = make("llama")
        return model, inputs, dict(task_type=task)
    model, inputs, _ = make_conv()
    return model, inputs, dict(target_modules=CONV_TARGETS, use_effective_conv2d=kind == "conv-effective")


@pytest.mark.parametrize("kind", ["llama", "conv", "conv-effective"])
def test_loha_keeps_the_method_promises(kind, tmp_path):
    model, inputs, kw = _model(kind)
    pm = mc.check_identity_at_init(model, inputs, peftx.LoHaConfig(r=4, alpha=8, **kw))
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path / "saved")
    mc.check_merge_matches(pm, inputs, atol=1e-5, rtol=1e-5)
    mc.check_trainable_params_equal_hf(model, peftx.LoHaConfig(r=4, **kw), peft.LoHaConfig(r=4, **kw))
    mc.check_hf_round_trip(model, inputs, peftx.LoHaConfig(r=4, alpha=6, **kw), peft.LoHaConfig(r=4, alpha=6, **kw),
                           tmp_path, atol=1e-5, rtol=1e-5)


def test_rank_and_alpha_patterns_and_layer_selection_match_hf():
    model, _, _ = make("llama")
    kw = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"],
              rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"q_proj": 3},
              layers_to_transform=[1])
    mc.check_trainable_params_equal_hf(model, peftx.LoHaConfig(**kw), peft.LoHaConfig(**kw))
    pm = peftx.get_peft_model(twin(model), peftx.LoHaConfig(**kw))
    layers = pm.base_model.model.model.layers
    assert layers[1].self_attn.v_proj.r == {"default": 2} and layers[1].mlp.down_proj.r == {"default": 6}
    assert layers[1].self_attn.q_proj.scaling == {"default": 3 / 4}
    assert not isinstance(layers[0].self_attn.q_proj, peftx.LoHaLinear)


def _layer(kind, dtype, effective=False, init_weights=False, r=4, alpha=6, **extra):
    base, x = make_base(kind, dtype)
    cls = peftx.LoHaLinear if isinstance(base, nn.Linear) else peftx.LoHaConv2d
    cfg = dict(r=r, alpha=alpha, use_effective_conv2d=effective, init_weights=init_weights, **extra)
    ours = cls(base, "default", r, alpha, peftx.LoHaConfig(**cfg))
    hf_cls = hf_loha.Linear if isinstance(base, nn.Linear) else hf_loha.Conv2d
    return ours, hf_twin(ours, hf_cls, peft.LoHaConfig(**cfg), r, alpha), x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("kind", ["linear", "linear-3d", "conv3x3", "conv1x1", "conv-grouped-strided"])
def test_layer_forward_and_gradients_equal_hf(kind, effective, dtype):
    ours, theirs, x = _layer(kind, dtype, effective)
    tucker = "default" in ours.hada_t1
    assert tucker == (effective and kind in ("conv3x3", "conv-grouped-strided"))  # HF PEFT's rule
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yo, yt = ours(xo), theirs(xt)
    assert yo.dtype == yt.dtype == dtype
    torch.testing.assert_close(yo, yt, **LAYER_TOL[dtype])
    g = torch.randn(yo.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    yo.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, **LAYER_TOL[dtype])
    go, gt = factor_grads(ours, ours.param_names), factor_grads(theirs, ours.param_names)
    assert go.keys() == gt.keys() and all(v is not None for v in go.values())
    if tucker:
        # HF PEFT's HadaWeightCP.backward gives w1_a (w2_a) the gradient built from the other
        # operand's core (t2, w2_b): it fails gradcheck. Those two are checked against autograd of
        # the update's formula instead.
        gt.update(_autograd_factor_grads(ours, x, g, ["hada_w1_a", "hada_w2_a"]))
    for n in go:
        torch.testing.assert_close(go[n], gt[n], atol=2e-4 * gt[n].abs().max().item() + 1e-6, rtol=2e-3, msg=n)


def _autograd_factor_grads(layer, x, g, names):
    f = {n: getattr(layer, n)["default"].detach().clone().requires_grad_(True) for n in layer.param_names
         if "default" in getattr(layer, n)}
    delta = hada_weight_cp_ref(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"], f["hada_t2"], f["hada_w2_a"],
                               f["hada_w2_b"], layer.scaling["default"])
    b = layer.base_layer
    y = torch.nn.functional.conv2d(x.to(delta.dtype), delta, None, b.stride, b.padding, b.dilation, b.groups)
    grads = torch.autograd.grad(y, [f[n] for n in names], g.to(y.dtype))
    return dict(zip(names, grads))


@pytest.mark.parametrize("effective", [False, True])
def test_non_zero_padding_modes_pad_the_update_like_the_base(effective):
    # HF PEFT convolves the update with zero padding whatever the base's padding_mode, so its unmerged
    # output differs from its merged one; peftx pads like the base: unmerged == merged.
    ours, _, x = _layer("conv-reflect", torch.float32, effective)
    y = ours(x)
    ours.merge()
    torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_training_dropouts_are_drawn_as_hf_draws_them(kind):
    ours, theirs, x = _layer(kind, torch.float32, rank_dropout=0.5, module_dropout=0.3)
    ours.train()
    theirs.train()
    skipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        yo = ours(x)
        torch.manual_seed(seed)
        yt = theirs(x)
        torch.testing.assert_close(yo, yt, atol=2e-5, rtol=2e-5)
        skipped += torch.equal(yo, ours.base_layer(x))
    assert 0 < skipped < 12  # some forwards skipped the adapter, some did not
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)


def test_two_active_adapters_equal_hf():
    ours, theirs, x = _layer("linear", torch.float32)
    cfg2 = dict(r=3, alpha=5, init_weights=False)
    ours.add_adapter("other", 3, 5, peftx.LoHaConfig(**cfg2))
    theirs.update_layer("other", 3, 5, config=peft.LoHaConfig(**cfg2))
    copy_factors(ours, theirs, "other")
    ours.set_adapter(["default", "other"])
    theirs.set_adapter(["default", "other"])
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)
    ours.set_adapter("other")
    theirs.set_adapter("other")
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_merge_unmerge_and_disable(kind):
    ours, theirs, x = _layer(kind, torch.float32, effective=True)
    ref = ours(x)
    base_out = ours.base_layer(x)
    w0 = ours.base_layer.weight.detach().clone()
    torch.testing.assert_close(ours.get_delta_weight("default"), theirs.get_delta_weight("default"))
    ours.merge()
    assert ours.merged
    torch.testing.assert_close(ours.base_layer(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-6, rtol=0)
    ours.enable_adapters(False)
    torch.testing.assert_close(ours(x), base_out)
    ours.enable_adapters(True)
    torch.testing.assert_close(ours(x), ref)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_cpu_autocast_bf16_trains_and_matches_hf(kind):
    ours, theirs, x = _layer(kind, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yo, yt = ours(x), theirs(x)
        torch.testing.assert_close(yo.float(), yt.float(), atol=5e-2, rtol=5e-2)
        yo.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in ours.named_parameters() if "hada_" in n)


def test_unload_returns_the_untouched_base_and_disable_adapter_computes_it():
    model, inputs, _ = make("llama")
    mc.check_unload_and_disable(model, inputs, peftx.LoHaConfig(task_type="CAUSAL_LM", r=4, init_weights=False),
                                ("hada_", "lokr_"))


def test_bf16_model_keeps_fp32_factors_as_hf():
    model, inputs, _ = make("llama")
    cfg = dict(task_type="CAUSAL_LM", r=4)
    mc.check_bf16_model_keeps_fp32_factors_as_hf(model.to(torch.bfloat16), inputs, peftx.LoHaConfig(**cfg),
                                                 peft.LoHaConfig(**cfg), "hada_")


@pytest.mark.parametrize("scale", ["float", "rows"])
def test_hada_weight_functions_match_plain_autograd(scale):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    out, inn, r = 5, 3, 2
    s = 0.7 if scale == "float" else torch.rand(out, generator=g, dtype=torch.float64)
    plain = (rnd(out, r), rnd(r, inn), rnd(out, r), rnd(r, inn))
    torch.testing.assert_close(hada_weight(*plain, s), hada_weight_ref(*plain, s))
    assert torch.autograd.gradcheck(lambda *a: hada_weight(*a, s), plain)
    cp = (rnd(r, r, 2, 3), rnd(r, out), rnd(r, inn), rnd(r, r, 2, 3), rnd(r, out), rnd(r, inn))
    torch.testing.assert_close(hada_weight_cp(*cp, s), hada_weight_cp_ref(*cp, s))
    assert torch.autograd.gradcheck(lambda *a: hada_weight_cp(*a, s), cp)
    for bias in (None, rnd(out)):
        lin = (rnd(2, 3, inn), rnd(out, inn), bias, *plain)
        torch.testing.assert_close(loha_linear(*lin, s), loha_linear_ref(*lin, s))
        assert torch.autograd.gradcheck(lambda *a: loha_linear(*a, s), lin)


def test_loha_linear_keeps_no_out_by_in_tensor_for_backward():
    layer, _, x = _layer("linear", torch.float32)
    x = x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    own = {p.data_ptr() for p in layer.parameters()} | {x.data_ptr()}
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in own]
    assert saved and not extra, extra  # x, W and the factors only: no W + dW, no products
    assert x.grad is not None and all(p.grad is not None for n, p in layer.named_parameters() if "hada_" in n)


def test_unsupported_layer_types_are_named():
    model, _, _ = make("gpt2")  # transformers Conv1D
    with pytest.raises(ValueError, match=r"Conv1D is not supported by LoHa; supported: torch\.nn\.Linear, "
                                         r"torch\.nn\.Conv2d"):
        peftx.get_peft_model(model, peftx.LoHaConfig(target_modules=["c_attn"]))
    model, _, _ = make("llama")
    with pytest.raises(ValueError, match="Embedding is not supported by LoHa"):
        peftx.get_peft_model(model, peftx.LoHaConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="base_layer must be a torch.nn.Conv2d"):
        peftx.LoHaConv2d(nn.Linear(3, 4))


@pytest.mark.parametrize("bad, match", [
    (dict(r=0), "r must be a positive integer"), (dict(alpha=-1), "alpha must be a positive number"),
    (dict(rank_dropout=1.0), r"rank_dropout must be in \[0, 1\)"), (dict(module_dropout=-0.1), "module_dropout"),
    (dict(init_weights="lycoris"), "init_weights must be one of"),
    (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform")])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        peftx.LoHaConfig(**bad)


def test_layer_input_errors():
    ours, _, _ = _layer("conv3x3", torch.float32)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 6, H, W\]"):
        ours(torch.randn(2, 5, 4, 4))
    lin, _, _ = _layer("linear", torch.float32)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 24\]"):
        lin(torch.randn(2, 23))
    with pytest.raises(ValueError, match="already exists"):
        lin.add_adapter("default", 2, 2, peftx.LoHaConfig())
    copy.deepcopy(lin)  # layers deep-copy (twin models in the checks)
