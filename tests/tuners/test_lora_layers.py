"""LoraLinear / LoraLinear4bit / LoraEmbedding: identity at init, equality with HF PEFT's LoRA layers,
gradients vs the reference, dropout reproducibility (manual_seed, checkpointing), named adapters,
merge/unmerge, mixed-adapter batches, bad input."""

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import peftx
from peftx.ops.reference import lora_linear_ref

GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-2, rtol=3e-2),
            torch.bfloat16: dict(atol=3e-1, rtol=6e-2)}


def randomize(layer):
    for name in layer.adapters:
        nn.init.normal_(layer.lora_B[name].weight, std=0.5)


def test_identity_at_init_and_hf_init_rules():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    m = peftx.LoraLinear(base, r=4, lora_alpha=8)
    x = torch.randn(5, 40)
    assert torch.equal(m(x), base(x))
    assert m.scaling["default"] == 2.0
    assert torch.count_nonzero(m.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert m.lora_A["default"].weight.abs().max() <= bound
    assert m.lora_A["default"].weight.dtype == torch.float32
    assert not base.weight.requires_grad and m.lora_A["default"].weight.requires_grad
    assert peftx.LoraLinear(nn.Linear(40, 24), r=4, lora_alpha=8, use_rslora=True).scaling["default"] == 4.0


def test_matches_hf_peft_lora_linear_forward_and_gradients():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as HFLinear
    torch.manual_seed(1)
    base = nn.Linear(48, 20)
    ours = peftx.LoraLinear(base, r=6, lora_alpha=12)
    randomize(ours)
    hf_base = nn.Linear(48, 20)
    hf_base.load_state_dict(base.state_dict())
    hf = HFLinear(hf_base, "default", config=LoraConfig(r=6, lora_alpha=12), r=6, lora_alpha=12)
    hf.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
    hf.lora_B["default"].weight.data.copy_(ours.lora_B["default"].weight)
    x = torch.randn(2, 7, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_hf = ours(x), hf(x2)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_hf.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for k in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, k)["default"].weight.grad, getattr(hf, k)["default"].weight.grad,
                                   atol=1e-5, rtol=1e-5)
    # Same module structure, so the same state-dict keys as HF PEFT.
    assert set(ours.state_dict()) == set(hf.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradients_match_reference(dtype, p):
    torch.manual_seed(2)
    base = nn.Linear(33, 17).to(dtype)
    m = peftx.LoraLinear(base, r=3, lora_alpha=6, lora_dropout=p)
    randomize(m)
    x = torch.randn(4, 33, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)
    seed = peftx.ops.lora.draw_seed()  # the seed the layer drew
    assert y.dtype == dtype
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    xr = x.detach().float().requires_grad_()
    Ar, Br = (t.detach().clone().requires_grad_() for t in (A, B))
    ref = lora_linear_ref(xr, base.weight.float(), base.bias.float(), Ar.to(dtype).float(), Br.to(dtype).float(),
                          2.0, p, seed)
    g = torch.randn(4, 17)
    y.backward(g.to(dtype))
    ref.backward(g)
    torch.testing.assert_close(x.grad.float(), xr.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(A.grad, Ar.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(B.grad, Br.grad, **GRAD_TOL[dtype])
    assert A.grad.dtype == torch.float32  # fp32 master adapter weights


def test_dropout_reproducible_with_manual_seed_and_checkpointing():
    base = nn.Linear(64, 32)
    m = peftx.LoraLinear(base, r=8, lora_dropout=0.3)
    randomize(m)
    x = torch.randn(10, 64)
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    b = m(x)
    assert torch.equal(a, b)
    c = m(x)
    assert not torch.equal(a, c)  # a fresh mask each forward
    # Gradient checkpointing recomputes the forward with the same RNG state, hence the same mask.
    grads = []
    for use_ckpt in (False, True):
        m.zero_grad()
        torch.manual_seed(11)
        y = checkpoint(m, x, use_reentrant=False) if use_ckpt else m(x)
        y.square().sum().backward()
        grads.append(m.lora_A["default"].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_conv1d_base_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(3)
    conv = Conv1D(30, 20)  # weight [in=20, out=30]
    nn.init.normal_(conv.bias)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        m = peftx.LoraLinear(conv, r=4)
    randomize(m)
    x = torch.randn(3, 20)
    want = lora_linear_ref(x, conv.weight.t(), conv.bias, m.lora_A["default"].weight, m.lora_B["default"].weight,
                           1 / 4 * 8)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    before = m(x)
    m.merge()
    torch.testing.assert_close(conv(x), before, atol=1e-5, rtol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)


def test_named_adapters_add_set_delete_disable():
    torch.manual_seed(4)
    base = nn.Linear(16, 8)
    m = peftx.LoraLinear(base, r=2)
    m.add_adapter("other", r=4, lora_alpha=4)
    randomize(m)
    x = torch.randn(3, 16)
    y_default = m(x)
    m.set_adapter("other")
    y_other = m(x)
    assert not torch.allclose(y_default, y_other)
    assert not m.lora_A["default"].weight.requires_grad and m.lora_A["other"].weight.requires_grad
    m.set_adapter(["default", "other"])
    torch.testing.assert_close(m(x), y_default + y_other - base(x), atol=1e-5, rtol=1e-5)
    m.enable_adapters(False)
    assert torch.equal(m(x), base(x))
    m.enable_adapters(True)
    m.delete_adapter("other")
    assert m.active_adapters == ["default"] and "other" not in m.lora_A
    torch.testing.assert_close(m(x), y_default)


def test_merge_unmerge_dense():
    torch.manual_seed(5)
    base = nn.Linear(32, 16)
    m = peftx.LoraLinear(base, r=4, lora_alpha=16)
    randomize(m)
    x = torch.randn(6, 32)
    before = m(x)
    w0 = base.weight.detach().clone()
    m.merge()
    assert m.merged_adapters == ["default"]
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base(x), before, atol=1e-5, rtol=1e-5)
    m.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)


def test_qlora_layer_gradients_merge_and_exact_unmerge():
    torch.manual_seed(6)
    linear = nn.Linear(128, 48)
    m = peftx.LoraLinear4bit.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.0, compute_dtype=torch.float32)
    randomize(m)
    x = torch.randn(5, 128, requires_grad=True)
    y = m(x)
    W = m.base_layer.weight.dequantize(torch.float32)
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    xr = x.detach().clone().requires_grad_()
    ref = lora_linear_ref(xr, W, m.base_layer.bias, A, B, 2.0)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)  # dx includes the NF4 base path
    assert m.base_layer.bias.grad is None and not m.base_layer.bias.requires_grad
    # Merge: dequantize + delta, re-quantize; the error is reported; unmerge gives back the same bytes.
    packed0 = m.base_layer.weight.packed.clone()
    absmax0 = m.base_layer.weight.absmax.clone()
    with torch.no_grad():
        before = m(x)
        m.merge()
        err = m.merge_errors["default"]
        assert 0 < err < 0.2
        assert not torch.equal(m.base_layer.weight.packed, packed0)
        torch.testing.assert_close(m(x), before, atol=0.5, rtol=0.1)
        m.unmerge()
    assert torch.equal(m.base_layer.weight.packed, packed0) and torch.equal(m.base_layer.weight.absmax, absmax0)
    torch.testing.assert_close(m(x), before, atol=0, rtol=0)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_qlora_double_quant_saves_x_and_u_and_matches_the_op(p):
    # With double-quantized absmax the layer's autograd keeps x, u and the weight's own tensors (the
    # fp32 absmax is decoded again in backward), and gives the op's gradients bit for bit.
    torch.manual_seed(8)
    m = peftx.LoraLinear4bit.from_linear(nn.Linear(256, 96), r=8, lora_alpha=16, lora_dropout=p,
                                         compute_dtype=torch.float32)
    randomize(m)
    w = m.base_layer.weight
    assert w.double_quant
    x = torch.randn(6, 256, requires_grad=True)
    own = {t.untyped_storage().data_ptr() for t in w.tensors().values()}
    own |= {t.untyped_storage().data_ptr() for t in m.parameters()} | {x.untyped_storage().data_ptr()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved.append(tuple(t.shape))
        return t
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert saved == [(6, 8)], saved  # u only
    g = torch.randn_like(y)
    y.backward(g)
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    got = (x.grad, A.grad, B.grad)
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(1)
    seed = peftx.ops.lora.draw_seed() if p > 0 else 0
    yr, _ = peftx.ops.lora.lora_linear_fwd(xr, w.packed, w.absmax_fp32(), w.code, w.blocksize,
                                           m.base_layer.bias, Ar, Br, 2.0, p, seed)
    assert torch.equal(y, yr)
    yr.backward(g)
    for a, b in zip(got, (xr.grad, Ar.grad, Br.grad)):
        assert torch.equal(a, b)


def test_qlora_layers_of_one_size_share_the_absmax_buffer_safely():
    # On the CPU the decoded absmax goes into one per-thread buffer per size (csrc/lora/lora_nf4dq.cpp's
    # decoded_absmax): layers of one shape, forwards and backwards interleaved, and threads running
    # at once still get each layer's own result.
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(5)
    layers = [peftx.LoraLinear4bit.from_linear(nn.Linear(128, 64), r=4, compute_dtype=torch.float32)
              for _ in range(2)]
    for m in layers:
        randomize(m)
        m.eval()  # no dropout: runs must agree exactly
    x = torch.randn(5, 128)

    def step(m):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y))
        return y.detach(), xi.grad

    alone = [step(m) for m in layers]
    xs = [x.clone().requires_grad_() for _ in layers]
    ys = [m(xi) for m, xi in zip(layers, xs)]  # both forwards, then both backwards
    sum(y.sum() for y in ys).backward()
    for (y_ref, dx_ref), y, xi in zip(alone, ys, xs):
        assert torch.equal(y, y_ref) and torch.equal(xi.grad, dx_ref)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for (y_ref, dx_ref), (y, dx) in zip(alone, pool.map(step, layers)):
                assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_qlora_bf16_compute_and_output_dtype():
    torch.manual_seed(7)
    m = peftx.LoraLinear4bit.from_linear(nn.Linear(64, 32, bias=False), r=4)
    assert m.base_layer.compute_dtype == torch.bfloat16
    assert m.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 64)
    y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, m.base_layer(x), atol=0, rtol=0)  # B = 0 at init
    y.sum().backward()
    assert m.lora_B["default"].weight.grad is not None


@pytest.mark.parametrize("layer_kind", ["dense", "nf4"])
def test_mixed_adapter_batch_matches_per_sample(layer_kind):
    torch.manual_seed(8)
    linear = nn.Linear(24, 12)
    m = peftx.LoraLinear(linear, r=2) if layer_kind == "dense" else \
        peftx.LoraLinear4bit.from_linear(linear, r=2, compute_dtype=torch.float32)
    m.add_adapter("b", r=5, lora_alpha=3)
    m.add_adapter("c", r=3, lora_alpha=9)
    randomize(m)
    m.eval()
    x = torch.randn(5, 4, 24)
    names = ["b", "__base__", "default", "c", "b"]
    got = m(x, adapter_names=names)
    for i, n in enumerate(names):
        if n == "__base__":
            m.enable_adapters(False)
        else:
            m.enable_adapters(True)
            m.set_adapter(n)
        torch.testing.assert_close(got[i], m(x[i:i + 1])[0], atol=1e-5, rtol=1e-5)
    m.enable_adapters(True)


def test_mixed_batch_matches_hf_peft_adapter_names():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as HFLinear
    torch.manual_seed(9)
    base = nn.Linear(20, 10)
    ours = peftx.LoraLinear(base, r=2, adapter_name="a")
    ours.add_adapter("b", r=4, lora_alpha=2)
    randomize(ours)
    hf_base = nn.Linear(20, 10)
    hf_base.load_state_dict(base.state_dict())
    hf = HFLinear(hf_base, "a", config=LoraConfig(r=2, lora_alpha=8), r=2, lora_alpha=8)
    hf.update_layer("b", r=4, lora_alpha=2, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                    config=LoraConfig(r=4, lora_alpha=2))
    for n in ("a", "b"):
        hf.lora_A[n].weight.data.copy_(ours.lora_A[n].weight)
        hf.lora_B[n].weight.data.copy_(ours.lora_B[n].weight)
    ours.eval()
    hf.eval()
    x = torch.randn(3, 6, 20)
    names = ["b", "a", "__base__"]
    torch.testing.assert_close(ours(x, adapter_names=names), hf(x, adapter_names=names), atol=1e-5, rtol=1e-5)


def test_embedding_lora():
    torch.manual_seed(10)
    emb = nn.Embedding(50, 16, padding_idx=0)
    m = peftx.LoraEmbedding(emb, r=4, lora_alpha=8)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(m(ids), emb(ids))  # A = 0 at init
    nn.init.normal_(m.lora_embedding_A["default"])
    want = emb(ids) + 2.0 * (m.lora_embedding_A["default"].t()[ids] @ m.lora_embedding_B["default"].t())
    torch.testing.assert_close(m(ids), want, atol=1e-5, rtol=1e-5)
    m(ids).sum().backward()
    assert m.lora_embedding_A["default"].grad is not None and emb.weight.grad is None
    before = m(ids).detach()
    m.merge()
    torch.testing.assert_close(m(ids), before, atol=1e-5, rtol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m(ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha must be a positive number"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
    (dict(adapter_name=""), "adapter_name must be a non-empty string"),
    (dict(adapter_name="update"), "collides with an attribute name"),
    (dict(adapter_name="base_layer"), "collides with an attribute name"),
    (dict(adapter_name="__base__"), "reserved"),
    (dict(init_lora_weights="eva"), "init_lora_weights must be"),
    (dict(init_lora_weights="pissa"), r"r \(8\) must be at most min\(in_features, out_features\) \(4\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        peftx.LoraLinear(nn.Linear(8, 4), **kwargs)


def test_bad_use():
    m = peftx.LoraLinear(nn.Linear(8, 4), r=2)
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("default")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
        m(torch.randn(3, 9))
    with pytest.raises(ValueError, match="unknown adapter"):
        m.set_adapter("nope")
    m.eval()
    with pytest.raises(ValueError, match="one name per sample"):
        m(torch.randn(3, 8), adapter_names=["default"])
    with pytest.raises(ValueError, match="unknown adapters"):
        m(torch.randn(2, 8), adapter_names=["default", "zzz"])
    with pytest.raises(TypeError, match="base must be"):
        peftx.LoraLinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="base must be a peftx.Linear4bit"):
        peftx.LoraLinear4bit(nn.Linear(8, 4))
    m.merge()
    with pytest.raises(ValueError, match="unmerge"):
        m.delete_adapter("default")
