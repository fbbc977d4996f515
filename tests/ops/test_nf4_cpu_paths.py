"""The NF4 CPU kernels on every instruction-set path (PEFTX_CPU_ISA=avx512 / avx2 / scalar, each
skipped where this CPU lacks it): byte equality of quantize / dequantize / double quantization with
the references and across paths, the products on tail shapes (in_features not a multiple of 32 or
64, blocks straddling rows, odd out_features, every GEMV token tile and the GEMM path), threads,
and the memory promise of nf4_matmul (peak extra allocation below a quarter of the dense weight)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import peftx
from peftx._native import _C
from peftx.ops import nf4 as ops
from peftx.ops.reference import (DYNAMIC_CODE, NF4_CODE, NF4_MIDPOINTS, nf4_dequantize_ref, nf4_double_dequantize_ref,
                                 nf4_double_quantize_ref, nf4_matmul_ref, nf4_matmul_t_ref, nf4_quantize_ref)

ISAS = ["avx512", "avx2", "scalar"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param not in _C.cpu_isas():
        pytest.skip(f"this CPU does not support {request.param}")
    monkeypatch.setenv("PEFTX_CPU_ISA", request.param)
    assert _C.cpu_isa() == request.param
    return request.param


# Unit roundoff per dtype of the products (see test_nf4_ops.py); bf16 activations on the AVX-512
# BF16 kernel also round the code book to bf16, an error of the same order as x's own rounding.
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_product_close(got, ref, dtype, k):
    torch.testing.assert_close(got.float(), ref.float(), atol=2 * EPS[dtype] * max(k, 1) ** 0.5, rtol=EPS[dtype] * 4)


def _weight(gen, shape, dtype, kind):
    n = shape[0] * shape[1]
    if kind == "normal":
        w = torch.randn(shape, generator=gen)
    elif kind == "scaled":  # block maxima over many decades, subnormal products included
        # (bounded so float16 stays finite)
        w = torch.randn(shape, generator=gen) * torch.exp((torch.randn(n, generator=gen) * 12).clamp(-80, 8)).reshape(shape)
    elif kind == "midpoints":  # exactly on the decision boundaries, where rounding decides
        idx = torch.randint(0, 15, shape, generator=gen)
        w = NF4_MIDPOINTS[idx] * torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, -1.0)
        w.view(-1)[::32] = 1.0
    elif kind == "zeros":  # all-zero blocks, signed zeros
        w = torch.zeros(shape)
        w.view(-1)[1::7] = -0.0
        w.view(-1)[::97] = torch.randn(w.view(-1)[::97].shape, generator=gen)
    return w.to(dtype)


QSHAPES = [(1, 1), (3, 5), (7, 100), (33, 257), (64, 64), (17, 4096), (5, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 1024, 4096])
@pytest.mark.parametrize("kind", ["normal", "scaled", "midpoints", "zeros"])
def test_quantize_dequantize_byte_equal(isa, dtype, blocksize, kind):
    gen = torch.Generator().manual_seed(blocksize * 7 + len(kind))
    for shape in QSHAPES:
        w = _weight(gen, shape, dtype, kind)
        packed, absmax = ops.nf4_quantize(w, blocksize)
        rp, ra = nf4_quantize_ref(w, blocksize)
        assert torch.equal(packed, rp), shape
        assert torch.equal(absmax, ra), shape
        for out in DTYPES:
            got = ops.nf4_dequantize(packed, absmax, NF4_CODE, blocksize, shape, out)
            ref = nf4_dequantize_ref(packed, absmax, NF4_CODE, blocksize, shape, out)
            assert torch.equal(got, ref), (shape, out)


def test_dequantize_special_scales_match_scalar(isa, monkeypatch):
    """Overflow to inf in fp16, NaN and inf scales, subnormal results: bit patterns equal to the
    scalar path (which the references agree with on non-NaN values)."""
    n = 4096 + 37
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.tensor([1e30, float("nan"), float("inf"), 1e-40, 3e-39, 65504.0, 1.0, -0.0] * 9)[:(n + 63) // 64]
    for out in DTYPES:
        got = ops.nf4_dequantize(packed, absmax, NF4_CODE, 64, (n,), out)
        monkeypatch.setenv("PEFTX_CPU_ISA", "scalar")
        ref = ops.nf4_dequantize(packed, absmax, NF4_CODE, 64, (n,), out)
        monkeypatch.setenv("PEFTX_CPU_ISA", isa)
        bits = torch.int32 if out == torch.float32 else torch.int16
        assert torch.equal(got.view(bits), ref.view(bits)), out


@pytest.mark.parametrize("out_f,in_f", [(2050, 1000), (1500, 999)])
def test_gemm_tiles_with_odd_and_unaligned_starts(isa, out_f, in_f):
    """Several row tiles (nf4_matmul) and column tiles (nf4_matmul_t) whose rows start mid-block
    and, for odd in_features, on a low nibble."""
    w = peftx.nf4_quantize(torch.randn(out_f, in_f), blocksize=64)
    assert _C.nf4_gemm_tile_cols(out_f, in_f, 4) < in_f and _C.nf4_gemm_tile_rows(out_f, in_f, 4) < out_f
    packed, absmax, code = w.packed, w.absmax_fp32(), w.code
    x = torch.randn(20, in_f)
    assert_product_close(ops.nf4_matmul_raw(x, packed, absmax, code, 64, out_f),
                         nf4_matmul_ref(x, packed, absmax, code, 64, out_f), torch.float32, in_f)
    g = torch.randn(20, out_f)
    assert_product_close(ops.nf4_matmul_t_raw(g, packed, absmax, code, 64, in_f),
                         nf4_matmul_t_ref(g, packed, absmax, code, 64, in_f), torch.float32, out_f)


@pytest.mark.parametrize("bad", [[1.0, float("nan")], [float("inf"), 1.0], [-float("inf"), 0.0]])
@pytest.mark.parametrize("n", [2, 64, 100, 4096 + 40])
def test_quantize_rejects_non_finite(isa, bad, n):
    w = torch.randn(n)
    w[n // 2 - 1:n // 2 + 1] = torch.tensor(bad)
    w[-1] = next(v for v in bad if v != 1.0 and v != 0.0)  # also in the (possibly partial) tail block
    with pytest.raises(RuntimeError, match="NaN or inf"):
        ops.nf4_quantize(w.reshape(1, n), 64)


@pytest.mark.parametrize("n", [1, 15, 16, 255, 256, 257, 1000, 70000])
@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_double_quantize_byte_equal(isa, n, scale):
    gen = torch.Generator().manual_seed(n)
    absmax = torch.rand(n, generator=gen) * scale
    if n > 300:
        absmax[256:512] = absmax[256:512].mean()  # an all-zero nested block after centring
    q, nested, offset = ops.nf4_double_quantize(absmax, DYNAMIC_CODE, 256)
    rq, rn, ro = nf4_double_quantize_ref(absmax, DYNAMIC_CODE, 256)
    assert torch.equal(q, rq) and torch.equal(nested, rn) and torch.equal(offset, ro)
    got = ops.nf4_double_dequantize(q, nested, DYNAMIC_CODE, offset, 256)
    assert torch.equal(got, nf4_double_dequantize_ref(q, nested, DYNAMIC_CODE, offset, 256))


# (out_features, in_features, blocksize): in % 64 == 0, in % 64 == 32 (half chunk), in % 32 != 0
# (generic rows), blocks straddling rows (in < blocksize, or in % blocksize != 0), odd out.
PSHAPES = [(33, 64, 64), (7, 96, 64), (9, 96, 32), (5, 100, 64), (31, 160, 128), (3, 2048, 4096),
           (6, 4000, 64), (65, 4096, 64), (2, 30, 32), (1, 1, 64), (11, 288, 256), (13, 33, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f,in_f,blocksize", PSHAPES)
def test_products_match_reference(isa, dtype, out_f, in_f, blocksize):
    gen = torch.Generator().manual_seed(out_f * in_f + blocksize)
    w = peftx.nf4_quantize(torch.randn(out_f, in_f, generator=gen), blocksize=blocksize)
    packed, absmax, code = w.packed, w.absmax_fp32(), w.code
    for M in (1, 2, 3, 4, 5, 16, 17, 40):  # every GEMV token tile, then the tiled GEMM
        x = torch.randn(M, in_f, generator=gen).to(dtype)
        b = torch.randn(out_f, generator=gen).to(dtype)
        got = ops.nf4_matmul_raw(x, packed, absmax, code, blocksize, out_f, b)
        assert got.dtype == dtype and got.shape == (M, out_f)
        assert_product_close(got, nf4_matmul_ref(x, packed, absmax, code, blocksize, out_f, b), dtype, in_f)
        g = torch.randn(M, out_f, generator=gen).to(dtype)
        got = ops.nf4_matmul_t_raw(g, packed, absmax, code, blocksize, in_f)
        assert got.dtype == dtype and got.shape == (M, in_f)
        assert_product_close(got, nf4_matmul_t_ref(g, packed, absmax, code, blocksize, in_f), dtype, out_f)


@pytest.mark.parametrize("out_f,in_f,blocksize", [(70, 256, 64), (65, 4096, 64), (128, 384, 128), (33, 192, 64)])
def test_bf16_small_batch_kernels_use_the_bf16_weight(isa, out_f, in_f, blocksize):
    """bf16 activations, 3 to 64 tokens (1 to 64 for g W) (the scaled-table forward: 2 rows x 8 tokens per pass; the
    row-pair transposed kernel: 32-row strips, 3-token tiles, permuted lanes): both multiply by
    exactly the bf16 weight nf4_dequantize returns, so they equal that dense product up to fp32
    summation order and the output's bf16 rounding. Odd rows (the pair's zero row), strips and
    token tiles with tails, and 64 / 65 tokens (the last GEMV size and the first tiled one)."""
    if isa != "avx512" or not _C.cpu_bf16_gemv():
        pytest.skip("the bf16 kernels need AVX-512 BF16 (other paths multiply by the fp32 weight)")
    gen = torch.Generator().manual_seed(out_f + in_f)
    w = peftx.nf4_quantize(torch.randn(out_f, in_f, generator=gen), blocksize=blocksize)
    w_bf16 = w.dequantize(torch.bfloat16).float()
    def check(got, a, b):
        # Output rounding (half a bf16 ulp, 2^-9 relative) plus fp32 summation error, which is
        # bounded by the sum of |terms|: far below the 2^-9 * sum|terms| a bf16-rounded code book
        # (bf16(code) * absmax instead of bf16(code * absmax)) would allow.
        want, scale = a.float() @ b, a.float().abs() @ b.abs()
        assert ((got.float() - want).abs() <= 2 ** -8 * want.abs() + 1e-5 * scale).all()

    for M in (3, 8, 9, 17, 24, 64, 65):
        x = torch.randn(M, in_f, generator=gen).bfloat16()
        check(peftx.nf4_matmul(x, w), x, w_bf16.T)
        if in_f % 128 == 0:  # the transposed kernel's shapes (others take the fp32 kernels)
            g = torch.randn(M, out_f, generator=gen).bfloat16()
            check(peftx.nf4_matmul_t(g, w), g, w_bf16)
    if in_f % 128 == 0:
        g = torch.randn(1, out_f, generator=gen).bfloat16()
        check(peftx.nf4_matmul_t(g, w), g, w_bf16)


def test_products_non_contiguous_and_leading_dims(isa):
    w = peftx.nf4_quantize(torch.randn(40, 96))
    x = torch.randn(2, 3, 192)[..., ::2]
    torch.testing.assert_close(peftx.nf4_matmul(x, w), x @ w.dequantize(torch.float32).T, atol=1e-4, rtol=1e-4)
    g = torch.randn(2, 80)[:, ::2]
    torch.testing.assert_close(peftx.nf4_matmul_t(g, w), g @ w.dequantize(torch.float32), atol=1e-4, rtol=1e-4)


def test_gemv_fp32_is_exact_linear_map(isa):
    """fp32 activations: W decodes exactly (code * absmax in fp32), so the GEMV equals the dense
    product up to summation order."""
    w = peftx.nf4_quantize(torch.randn(300, 1024))
    x = torch.randn(3, 1024, dtype=torch.float64)
    ref = (x @ w.dequantize(torch.float32).double().T)
    got = peftx.nf4_matmul(x.float(), w).double()
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("out_f,in_f,blocksize", [(33, 128, 32), (70, 256, 64), (9, 384, 128), (5, 512, 256),
                                                   (3, 1024, 4096), (17, 640, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transposed_fp32_kernel_is_exact_linear_map(isa, dtype, out_f, in_f, blocksize):
    """fp32 / fp16 g with in_features % 128 == 0 (the columns kernel on AVX-512: a task's 128-feature
    chunks in registers, lanes permuted by nibble, one or two chunks a pass at 1 token, tiles of 3
    tokens ending 2 + 2, groups of 24 tokens): g times the fp32 weight, exact up to fp32 summation,
    rounded once to g's dtype. Blocks of 32 (four per chunk), 64 (two), 128, and blocks longer than a
    row (4096 > 1024); odd rows; 1 to 50 tokens."""
    gen = torch.Generator().manual_seed(out_f * in_f + blocksize)
    w = peftx.nf4_quantize(torch.randn(out_f, in_f, generator=gen), blocksize=blocksize)
    wd = w.dequantize(torch.float32).double()
    for M in (1, 2, 3, 4, 5, 7, 24, 25, 50):
        g = torch.randn(M, out_f, generator=gen).to(dtype)
        got = peftx.nf4_matmul_t(g, w)
        assert got.dtype == dtype and got.shape == (M, in_f)
        want = g.double() @ wd
        u = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -24
        bound = 1e-6 * (g.double().abs() @ wd.abs()) + u * want.abs()
        assert ((got.double() - want).abs() <= bound + 1e-30).all(), (M, (got.double() - want).abs().max())


@pytest.mark.parametrize("out_f,in_f,blocksize", [(33, 128, 32), (70, 256, 64), (9, 384, 128), (6, 512, 256),
                                                   (3, 1024, 4096), (18, 640, 32), (5, 16384, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_fp32_kernel_is_exact_linear_map(isa, dtype, out_f, in_f, blocksize):
    """fp32 / fp16 x with in_features % 128 == 0, any token count (the rows kernel on AVX-512: x laid
    out in the decode's lane order, 4 rows x 4 tokens a tile, blocks of 32 tokens):
    x times the fp32 weight plus bias, exact up to fp32 summation, rounded once to x's dtype. Row
    tails of 1-3, token tails of 1-3, one and several token blocks, and slabs of x (32 tokens at
    16384 features: 71 tokens take three). (Other ISAs take fp32 tiles + BLAS
    and add the bias after rounding: two roundings.)"""
    gen = torch.Generator().manual_seed(out_f * in_f + blocksize + 1)
    w = peftx.nf4_quantize(torch.randn(out_f, in_f, generator=gen), blocksize=blocksize)
    wd = w.dequantize(torch.float32).double()
    b = torch.randn(out_f, generator=gen).to(dtype)
    for M in (1, 2, 3, 4, 5, 17, 18, 19, 20, 33, 64, 71):
        x = torch.randn(M, in_f, generator=gen).to(dtype)
        got = peftx.nf4_matmul(x, w, b)
        assert got.dtype == dtype and got.shape == (M, out_f)
        xw = x.double() @ wd.T
        want = xw + b.double()
        u = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -24
        bound = 1e-6 * (x.double().abs() @ wd.abs().T + b.double().abs()) + u * want.abs()
        if isa != "avx512":
            bound += u * xw.abs()
        assert ((got.double() - want).abs() <= bound + 1e-30).all(), (M, (got.double() - want).abs().max())


def test_results_do_not_depend_on_threads(isa):
    w = peftx.nf4_quantize(torch.randn(257, 512))
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    g = torch.randn(30, 257)  # two token groups of the fp32 transposed kernel
    xf = torch.randn(40, 512)  # two token blocks of the fp32 rows kernel
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = peftx.nf4_matmul(x, w)
        one_t = peftx.nf4_matmul_t(g, w)
        one_f = peftx.nf4_matmul(xf, w)
        q1 = peftx.nf4_quantize(torch.randn(300, 300, generator=torch.Generator().manual_seed(1)))
        torch.set_num_threads(max(2, before))
        two = peftx.nf4_matmul(x, w)
        two_t = peftx.nf4_matmul_t(g, w)
        two_f = peftx.nf4_matmul(xf, w)
        q2 = peftx.nf4_quantize(torch.randn(300, 300, generator=torch.Generator().manual_seed(1)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one_t, two_t) and torch.equal(one_f, two_f)
    assert torch.equal(q1.packed, q2.packed) and torch.equal(q1.absmax, q2.absmax)


def test_bad_isa_names_the_variable(monkeypatch):
    monkeypatch.setenv("PEFTX_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="PEFTX_CPU_ISA"):
        ops.nf4_quantize(torch.randn(4, 64), 64)
    monkeypatch.setenv("PEFTX_CPU_ISA", "auto")
    assert _C.cpu_isa() == _C.cpu_isas()[0]


# --- memory ------------------------------------------------------------------------------------

def test_tile_budget_is_fixed_bytes():
    budget = _C.nf4_tile_bytes()
    for rows, cols, elem in [(4096, 4096, 2), (11008, 4096, 4), (4096, 11008, 2), (32000, 4096, 2), (64, 64, 4)]:
        tr = _C.nf4_gemm_tile_rows(rows, cols, elem)
        assert 1 <= tr <= rows and tr * cols * elem <= max(budget, cols * elem)
        tc = _C.nf4_gemm_tile_cols(rows, cols, elem)
        assert 1 <= tc <= cols and rows * tc * elem <= max(budget, rows * 16 * elem)
        if rows * cols * elem >= 8 * budget:  # layers of real size: a tile is < 1/4 of the weight
            assert tr * cols * elem < rows * cols * elem / 4 and rows * tc * elem < rows * cols * elem / 4


def _peak_extra_bytes(fn, exclude):
    """Peak of live CPU allocations made during fn(), minus `exclude` bytes (its output)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live = peak = 0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    del out
    return peak - exclude


@pytest.mark.parametrize("M", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matmul_peak_extra_memory_below_quarter_of_dense_weight(M, dtype):
    N = K = 4096
    w = peftx.nf4_quantize(torch.randn(N, K))
    absmax = w.absmax_fp32()
    dense = N * K * torch.finfo(dtype).bits // 8
    x = torch.randn(M, K).to(dtype)
    out_bytes = M * N * x.element_size()
    peak = _peak_extra_bytes(lambda: ops.nf4_matmul_raw(x, w.packed, absmax, w.code, 64, N), out_bytes)
    assert peak < dense / 4, (peak, dense)
    g = torch.randn(M, N).to(dtype)
    peak_t = _peak_extra_bytes(lambda: ops.nf4_matmul_t_raw(g, w.packed, absmax, w.code, 64, K), out_bytes)
    assert peak_t < dense / 4, (peak_t, dense)
