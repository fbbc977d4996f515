"""peftx NF4 ops against their pure-torch references: dtypes x odd shapes x non-contiguous inputs,
opcheck, gradcheck, torch.compile, autocast, bad input."""

import pytest
import torch

import peftx
from peftx.ops import nf4 as ops
from peftx.ops.reference import (DYNAMIC_CODE, NF4_CODE, nf4_dequantize_ref, nf4_double_dequantize_ref,
                                 nf4_double_quantize_ref, nf4_matmul_ref, nf4_matmul_t_ref, nf4_quantize_ref)
from tests.conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(6, 42), (123, 42), (1, 1), (7, 100), (64, 64), (33, 257)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_quantize_dequantize_match_reference(device, dtype, shape, blocksize):
    w = torch.randn(shape, dtype=dtype, device=device)
    packed, absmax = ops.nf4_quantize(w, blocksize)
    rp, ra = nf4_quantize_ref(w, blocksize)
    assert torch.equal(packed, rp) and torch.equal(absmax, ra)
    code = NF4_CODE.to(device)
    for out_dtype in DTYPES:
        got = ops.nf4_dequantize(packed, absmax, code, blocksize, shape, out_dtype)
        assert torch.equal(got, nf4_dequantize_ref(packed, absmax, code, blocksize, shape, out_dtype))


def test_quantize_non_contiguous(device):
    w = torch.randn(50, 90, device=device)
    t = w.t()
    assert not t.is_contiguous()
    assert torch.equal(ops.nf4_quantize(t, 64)[0], ops.nf4_quantize(t.contiguous(), 64)[0])


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_double_quantize_match_reference(device, n):
    absmax = torch.rand(n, device=device) * 3
    q, nested, offset = ops.nf4_double_quantize(absmax, DYNAMIC_CODE.to(device), 256)
    rq, rn, ro = nf4_double_quantize_ref(absmax, DYNAMIC_CODE.to(device), 256)
    assert torch.equal(q, rq) and torch.equal(nested, rn) and torch.equal(offset, ro)
    dec = ops.nf4_double_dequantize(q, nested, DYNAMIC_CODE.to(device), offset, 256)
    assert torch.equal(dec, nf4_double_dequantize_ref(q, nested, DYNAMIC_CODE.to(device), offset, 256))
    assert (dec - absmax).abs().max() <= 0.02 * absmax.abs().max() + 1e-6
    out = torch.full((n,), float("nan"), device=device)
    assert ops.nf4_double_dequantize_into(q, nested, DYNAMIC_CODE.to(device), offset, 256, out) is out
    assert torch.equal(out, dec)


def test_double_dequantize_into_checks_out(device):
    q, nested, offset = ops.nf4_double_quantize(torch.rand(300, device=device), DYNAMIC_CODE.to(device), 256)
    code = DYNAMIC_CODE.to(device)
    for bad, match in [(torch.empty(299, device=device), "out must be a contiguous tensor of 300"),
                       (torch.empty(600, device=device)[::2], "not contiguous"),
                       (torch.empty(300, device=device, dtype=torch.float64), "out must be Float, got Double")]:
        with pytest.raises(RuntimeError, match=match):
            ops.nf4_double_dequantize_into(q, nested, code, offset, 256, bad)


# Unit roundoff per dtype: products with K terms whose operands are rounded to the dtype (the GEMM
# path decodes W into x's dtype, as bitsandbytes does) differ from the fp32 reference by about
# eps * sqrt(K) * |x| |w|; inputs here are O(1).
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_product_close(got, ref, dtype, k):
    tol = 2 * EPS[dtype] * max(k, 1) ** 0.5
    torch.testing.assert_close(got, ref, atol=tol, rtol=EPS[dtype] * 4)


def _state(out_f, in_f, device, blocksize=64):
    w = peftx.nf4_quantize(torch.randn(out_f, in_f, device=device), blocksize=blocksize)
    return w, w.packed, w.absmax_fp32(), w.code


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 3, 8, 9, 40])
@pytest.mark.parametrize("out_f,in_f", [(42, 123), (64, 64), (5, 7), (130, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_match_reference(device, dtype, M, out_f, in_f, bias):
    w, packed, absmax, code = _state(out_f, in_f, device)
    x = torch.randn(M, in_f, device=device, dtype=dtype)
    b = torch.randn(out_f, device=device, dtype=dtype) if bias else None
    got = ops.nf4_matmul_raw(x, packed, absmax, code, 64, out_f, b)
    assert got.dtype == dtype and got.shape == (M, out_f)
    assert_product_close(got, nf4_matmul_ref(x, packed, absmax, code, 64, out_f, b), dtype, in_f)
    g = torch.randn(M, out_f, device=device, dtype=dtype)
    assert_product_close(ops.nf4_matmul_t_raw(g, packed, absmax, code, 64, in_f),
                         nf4_matmul_t_ref(g, packed, absmax, code, 64, in_f), dtype, out_f)


def test_matmul_leading_dims_and_non_contiguous(device):
    w, packed, absmax, code = _state(30, 48, device)
    x = torch.randn(2, 3, 96, device=device)[..., ::2]
    assert not x.is_contiguous()
    y = peftx.nf4_matmul(x, w)
    assert y.shape == (2, 3, 30)
    torch.testing.assert_close(y, x @ w.dequantize(torch.float32).T, **TOL[torch.float32])
    g = torch.randn(4, 60, device=device)[:, ::2]
    torch.testing.assert_close(peftx.nf4_matmul_t(g, w), g @ w.dequantize(torch.float32), **TOL[torch.float32])


@pytest.mark.parametrize("M", [1, 5])
def test_packed_at_an_unaligned_address(device, M):
    # A packed tensor that starts one byte into its storage: the CUDA kernels that read W four bytes
    # at a time must not take it (they fall back to byte-wise reads and cuBLAS); the results agree.
    w, packed, absmax, code = _state(16, 64, device)
    buf = torch.zeros(packed.numel() + 1, 1, dtype=torch.uint8, device=device)
    buf[1:] = packed
    shifted = buf[1:]
    assert shifted.data_ptr() % 4 != 0
    want = ops.nf4_dequantize(packed, absmax, code, 64, (16, 64), torch.bfloat16)
    assert torch.equal(ops.nf4_dequantize(shifted, absmax, code, 64, (16, 64), torch.bfloat16), want)
    x = torch.randn(M, 64, device=device)
    torch.testing.assert_close(ops.nf4_matmul_raw(x, shifted, absmax, code, 64, 16, None),
                               nf4_matmul_ref(x, packed, absmax, code, 64, 16), **TOL[torch.float32])
    g = torch.randn(M, 16, device=device)
    torch.testing.assert_close(ops.nf4_matmul_t_raw(g, shifted, absmax, code, 64, 64),
                               nf4_matmul_t_ref(g, packed, absmax, code, 64, 64), **TOL[torch.float32])


def test_matmul_large_uses_tiles_correctly():
    # N * K above one tile (1 Mi elements) so the tiled GEMM path runs several tiles.
    w, packed, absmax, code = _state(600, 2048, "cpu")
    x = torch.randn(20, 2048)
    torch.testing.assert_close(peftx.nf4_matmul(x, w), nf4_matmul_ref(x, packed, absmax, code, 64, 600),
                               atol=1e-3, rtol=1e-4)
    g = torch.randn(20, 600)
    torch.testing.assert_close(peftx.nf4_matmul_t(g, w), nf4_matmul_t_ref(g, packed, absmax, code, 64, 2048),
                               atol=1e-3, rtol=1e-4)


def test_opcheck(device):
    w, packed, absmax, code = _state(24, 40, device)
    x = torch.randn(3, 40, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    cases = [
        (torch.ops.peftx.nf4_quantize.default, (torch.randn(24, 40, device=device), 64)),
        (torch.ops.peftx.nf4_dequantize.default, (packed, absmax, code, 64, [24, 40], torch.bfloat16)),
        (torch.ops.peftx.nf4_double_quantize.default, (absmax, DYNAMIC_CODE.to(device), 256)),
        (torch.ops.peftx.nf4_double_dequantize.default, (w.absmax, w.nested_absmax, w.nested_code, w.offset, 256)),
        (torch.ops.peftx.nf4_double_dequantize_into.default,
         (w.absmax, w.nested_absmax, w.nested_code, w.offset, 256, torch.empty(w.absmax.numel(), device=device))),
        (torch.ops.peftx.nf4_matmul.default, (x, packed, absmax, code, 64, 24, b)),
        (torch.ops.peftx.nf4_matmul.default, (x, packed, absmax, code, 64, 24, None)),
        (torch.ops.peftx.nf4_matmul_t.default, (torch.randn(3, 24, device=device, requires_grad=True), packed,
                                                absmax, code, 64, 40)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=tests)


def test_gradcheck_float64_through_fp32_kernel():
    # The kernels compute in fp32; gradcheck the exact linear map they implement with fp32 tolerances.
    w, packed, absmax, code = _state(6, 10, "cpu")
    x = torch.randn(3, 10, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: ops.nf4_matmul_raw(x, packed, absmax, code, 64, 6, b), (x, b),
                                    eps=1e-2, atol=1e-3, rtol=1e-3)
    g = torch.randn(3, 6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: ops.nf4_matmul_t_raw(g, packed, absmax, code, 64, 10), (g,),
                                    eps=1e-2, atol=1e-3, rtol=1e-3)
    assert torch.autograd.gradgradcheck(lambda x: ops.nf4_matmul_raw(x, packed, absmax, code, 64, 6), (x,),
                                        eps=1e-2, atol=1e-3, rtol=1e-3)


def test_backward_matches_reference(device):
    w, packed, absmax, code = _state(20, 33, device)
    x = torch.randn(4, 33, device=device, requires_grad=True)
    b = torch.randn(20, device=device, requires_grad=True)
    y = peftx.nf4_matmul(x, w, b)
    g = torch.randn_like(y)
    y.backward(g)
    wd = w.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, g @ wd, **TOL[torch.float32])
    torch.testing.assert_close(b.grad, g.sum(0), **TOL[torch.float32])


def test_torch_compile_fullgraph(device):
    w, packed, absmax, code = _state(16, 32, device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return ops.nf4_matmul_raw(x, packed, absmax, code, 64, 16).relu().sum()

    x = torch.randn(5, 32, device=device, requires_grad=True)
    out = f(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    ops.nf4_matmul_raw(x2, packed, absmax, code, 64, 16).relu().sum().backward()
    torch.testing.assert_close(out, ops.nf4_matmul_raw(x, packed, absmax, code, 64, 16).relu().sum())
    torch.testing.assert_close(x.grad, x2.grad)


def test_autocast_casts_activation_not_state(device):
    if device == "cuda":
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    w, packed, absmax, code = _state(16, 32, device)
    x = torch.randn(3, 32, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        y = ops.nf4_matmul_raw(x, packed, absmax, code, 64, 16)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ops.nf4_matmul_raw(x.to(dtype), packed, absmax, code, 64, 16))


@pytest.mark.parametrize("call,exc,match", [
    (lambda w: peftx.nf4_quantize(torch.randn(4, 4, 4)), ValueError, "2-D"),
    (lambda w: peftx.nf4_quantize(torch.randint(0, 3, (4, 4))), TypeError, "float32"),
    (lambda w: peftx.nf4_quantize(torch.randn(4, 64), blocksize=48), ValueError, "power of two"),
    (lambda w: peftx.nf4_quantize(torch.randn(4, 64), blocksize=8192), ValueError, "power of two"),
    (lambda w: peftx.nf4_quantize(torch.tensor([[1.0, float("nan")]])), ValueError, "NaN or inf"),
    (lambda w: peftx.nf4_quantize(torch.tensor([[1.0, float("inf")]])), ValueError, "NaN or inf"),
    (lambda w: peftx.nf4_matmul(torch.randn(3, 17), w), ValueError, "in_features"),
    (lambda w: peftx.nf4_matmul(torch.randn(3, 32).long(), w), TypeError, "float32"),
    (lambda w: peftx.nf4_matmul(torch.randn(3, 32), w, torch.randn(5)), ValueError, "bias"),
    (lambda w: peftx.nf4_matmul_t(torch.randn(3, 32), w), ValueError, "out_features"),
    (lambda w: torch.ops.peftx.nf4_quantize(torch.tensor([[float("nan")] * 64]), 64), RuntimeError, "NaN or inf"),
    (lambda w: torch.ops.peftx.nf4_matmul(torch.randn(2, 31), w.packed, w.absmax_fp32(), w.code, 64, 16, None),
     RuntimeError, "packed must hold"),
    (lambda w: torch.ops.peftx.nf4_dequantize(w.packed, w.absmax_fp32(), w.code, 48, [16, 32], torch.float32),
     RuntimeError, "blocksize must be a power of two"),
])
def test_bad_input(call, exc, match):
    w = peftx.nf4_quantize(torch.randn(16, 32))
    with pytest.raises(exc, match=match):
        call(w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_rejected():
    w = peftx.nf4_quantize(torch.randn(16, 32, device="cuda"))
    with pytest.raises(ValueError, match="device|cuda"):
        peftx.nf4_matmul(torch.randn(2, 32), w)
