"""LoKr: the method promises on a tiny Llama and a small conv model (every factor layout), layer
outputs and gradients equal to HF PEFT's LoKr layers with the same factors, the Linear term without
the Kronecker product against the materialised one, HF PEFT's factorization, dropouts, errors."""

import peft
import pytest
import torch
from peft.tuners.lokr import layer as hf_lokr
from torch import nn

import peftx
from peftx.tuners.lokr.layer import factorization, lokr_linear_term, lokr_linear_term_ref
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc
from tests.tuners.lycoris_helpers import CONV_TARGETS, copy_factors, factor_grads, hf_twin, make_base, make_conv

pytestmark = pytest.mark.usefixtures("isolated_rng")

LAYER_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# Factor layouts: (r, decompose_both, use_effective_conv2d) — full W1/W2, low-rank W2, both low-rank,
# the Tucker W2 of a conv.
LAYOUTS = {"full": (16, False, False), "lowrank-w2": (1, False, False), "decompose-both": (1, True, False),
           "tucker": (1, False, True)}


def _model(kind):
    if kind == "llama":
        model, inputs, task = make("llama")
        return model, inputs, dict(task_type=task)
    model, inputs, _ = make_conv()
    return model, inputs, dict(target_modules=CONV_TARGETS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["llama", "conv"])
def test_lokr_keeps_the_method_promises(kind, layout, tmp_path):
    if kind == "llama" and layout == "tucker":
        pytest.skip("no Conv2d in a Llama")
    model, inputs, kw = _model(kind)
    r, both, eff = LAYOUTS[layout]
    kw.update(r=r, decompose_both=both, use_effective_conv2d=eff)
    pm = mc.check_identity_at_init(model, inputs, peftx.LoKrConfig(alpha=2, **kw))
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path / "saved")
    mc.check_merge_matches(pm, inputs, atol=1e-5, rtol=1e-5)
    mc.check_trainable_params_equal_hf(model, peftx.LoKrConfig(**kw), peft.LoKrConfig(**kw))
    mc.check_hf_round_trip(model, inputs, peftx.LoKrConfig(alpha=3, **kw), peft.LoKrConfig(alpha=3, **kw), tmp_path,
                           atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["lycoris", False])
def test_other_inits_and_decompose_factor_match_hf_layouts(init, tmp_path):
    model, inputs, kw = _model("llama")
    kw.update(r=2, decompose_factor=4, init_weights=init)
    mc.check_trainable_params_equal_hf(model, peftx.LoKrConfig(**kw), peft.LoKrConfig(**kw))
    mc.check_hf_round_trip(model, inputs, peftx.LoKrConfig(**kw), peft.LoKrConfig(**kw), tmp_path, atol=1e-5, rtol=1e-5)
    pm = peftx.get_peft_model(twin(model), peftx.LoKrConfig(**kw))
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lokr_w1["default"].shape == (4, 4)  # 32 = 4 x 8 on both sides with decompose_factor=4
    same = torch.equal(logits(pm, inputs), logits(model, inputs))
    assert same == (init == "lycoris")  # 'lycoris' zeroes W2's factor: identity at init; False: random


def _layer(kind, dtype, layout="full", init_weights=False, alpha=6, **extra):
    r, both, eff = LAYOUTS[layout]
    base, x = make_base(kind, dtype)
    cls = peftx.LoKrLinear if isinstance(base, nn.Linear) else peftx.LoKrConv2d
    cfg = dict(r=r, alpha=alpha, decompose_both=both, use_effective_conv2d=eff, init_weights=init_weights, **extra)
    ours = cls(base, "default", r, alpha, peftx.LoKrConfig(**cfg))
    hf_cls = hf_lokr.Linear if isinstance(base, nn.Linear) else hf_lokr.Conv2d
    return ours, hf_twin(ours, hf_cls, peft.LoKrConfig(**cfg), r, alpha), x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["linear", "linear-3d", "conv3x3", "conv1x1", "conv-grouped-strided"])
def test_layer_forward_and_gradients_equal_hf(kind, layout, dtype):
    ours, theirs, x = _layer(kind, dtype, layout)
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
    for n in go:
        torch.testing.assert_close(go[n], gt[n], atol=2e-4 * gt[n].abs().max().item() + 1e-6, rtol=2e-3, msg=n)


@pytest.mark.parametrize("shape", [(1, 4, 6, 5, 3), (17, 8, 3, 7, 1), (0, 2, 2, 3, 3), (6, 1, 42, 1, 123)])
def test_linear_term_without_kron_matches_kron(shape):
    m, a, c, b, d = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, c * d, generator=g, dtype=torch.float64)
    w1 = torch.randn(a, c, generator=g, dtype=torch.float64)
    w2 = torch.randn(b, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lokr_linear_term(x, w1, w2), lokr_linear_term_ref(x, w1, w2))
    xt = torch.randn(c * d, m + 1, generator=g, dtype=torch.float64).t()  # non-contiguous tokens
    torch.testing.assert_close(lokr_linear_term(xt, w1, w2), lokr_linear_term_ref(xt, w1, w2))


def test_linear_term_gradients():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((3, 2, 6), (2, 3), (4, 2))]
    assert torch.autograd.gradcheck(lokr_linear_term, args)


def test_factorization_is_hf_peft_s():
    for n in [*range(1, 300), 512, 1536, 4096, 11008, 32000]:
        for f in (-1, 1, 2, 3, 4, 8, 16, 64, 1000):
            assert factorization(n, f) == hf_lokr.factorization(n, f), (n, f)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_training_dropouts_are_drawn_as_hf_draws_them(kind, scale):
    ours, theirs, x = _layer(kind, torch.float32, rank_dropout=0.5, module_dropout=0.3, rank_dropout_scale=scale)
    ours.train()
    theirs.train()
    skipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        yo = ours(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(yo, theirs(x), atol=2e-5, rtol=2e-5)
        skipped += torch.equal(yo, ours.base_layer(x))
    assert 0 < skipped < 12


def test_two_active_adapters_equal_hf():
    ours, theirs, x = _layer("linear", torch.float32)
    cfg2 = dict(r=1, alpha=5, init_weights=False, decompose_both=True)
    ours.add_adapter("other", 1, 5, peftx.LoKrConfig(**cfg2))
    theirs.update_layer("other", 1, 5, config=peft.LoKrConfig(**cfg2))
    copy_factors(ours, theirs, "other")
    ours.set_adapter(["default", "other"])
    theirs.set_adapter(["default", "other"])
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind, layout", [("linear", "decompose-both"), ("conv3x3", "tucker"), ("conv3x3", "full")])
def test_merge_unmerge_and_disable(kind, layout):
    ours, theirs, x = _layer(kind, torch.float32, layout)
    ref = ours(x)
    base_out = ours.base_layer(x)
    w0 = ours.base_layer.weight.detach().clone()
    torch.testing.assert_close(ours.get_delta_weight("default"), theirs.get_delta_weight("default"))
    ours.merge()
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-6, rtol=0)
    ours.enable_adapters(False)
    torch.testing.assert_close(ours(x), base_out)
    ours.enable_adapters(True)
    torch.testing.assert_close(ours(x), ref)


def test_unload_returns_the_untouched_base_and_disable_adapter_computes_it():
    model, inputs, _ = make("llama")
    mc.check_unload_and_disable(model, inputs, peftx.LoKrConfig(task_type="CAUSAL_LM", r=2, init_weights=False),
                                ("hada_", "lokr_"))


def test_bf16_model_keeps_fp32_factors_as_hf():
    model, inputs, _ = make("llama")
    cfg = dict(task_type="CAUSAL_LM", r=2)
    mc.check_bf16_model_keeps_fp32_factors_as_hf(model.to(torch.bfloat16), inputs, peftx.LoKrConfig(**cfg),
                                                 peft.LoKrConfig(**cfg), "lokr_")


def test_unsupported_layer_types_are_named():
    model, _, _ = make("gpt2")
    with pytest.raises(ValueError, match=r"Conv1D is not supported by LoKr; supported: torch\.nn\.Linear, "
                                         r"torch\.nn\.Conv2d"):
        peftx.get_peft_model(model, peftx.LoKrConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="base_layer must be a torch.nn.Linear"):
        peftx.LoKrLinear(nn.Conv2d(3, 4, 1))


@pytest.mark.parametrize("bad, match", [
    (dict(r=-2), "r must be a positive integer"), (dict(decompose_factor=2.5), "decompose_factor must be an integer"),
    (dict(init_weights="gaussian"), "init_weights must be one of"), (dict(rank_dropout=1.5), "rank_dropout")])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        peftx.LoKrConfig(**bad)
