"""The LoRA ops' own CPU kernels for the frozen dense base with few tokens (lora/cpu/dense_small_*:
x W^T for up to 16 fp32 / 4 bf16 tokens, g W for up to 16), against float64 references on shapes that
exercise their tiles (row groups of 8 with tails, 4-token and 6-/3-token tiles with tails, K panels,
32-row strips with tails, odd out_features in the bf16 row pairs), and against the BLAS path they
replace (PEFTX_CPU_ISA=scalar) and across thread counts."""

import pytest
import torch

from peftx._native import _C

ops = torch.ops.peftx

needs_avx512 = pytest.mark.skipif("avx512" not in _C.cpu_isas(), reason="needs an AVX-512 CPU")
SHAPES = [(70, 256), (33, 128), (64, 4096), (9, 1024), (1, 128), (131, 640)]  # (out_features, in_features)
TOKENS = [1, 2, 3, 4, 5, 7, 16, 17]


def _dtypes():
    return [torch.float32] + ([torch.bfloat16] if _C.cpu_bf16_gemv() else [])


def _check(got, a, b, dtype):
    # fp32 sums: error bounded by a small multiple of sum|terms|; bf16 adds the output's rounding.
    a, b = a.double(), b.double()
    want, scale = a @ b, a.abs() @ b.abs()
    out_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23
    assert ((got.double() - want).abs() <= out_ulp * want.abs() + 1e-5 * scale).all()


def _run(x, W, bias, g):
    R = 4
    A = torch.randn(R, x.shape[-1], dtype=x.dtype)
    B = torch.zeros(W.shape[0], R, dtype=x.dtype)  # no LoRA term: y and dx are the base products
    y, u = ops.lora_linear_fwd(x, W, None, None, 64, bias, A, B, 1.0, 0.0, 0)
    dx, _, _ = ops.lora_linear_bwd(g, x, u, W, None, None, 64, A, B, 1.0, 0.0, 0, True)
    return y, dx


@needs_avx512
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("N,K", SHAPES)
def test_base_products_match_float64(dtype, N, K):
    gen = torch.Generator().manual_seed(N * K)
    W = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    for M in TOKENS:
        x = torch.randn(M, K, generator=gen).to(dtype)
        g = torch.randn(M, N, generator=gen).to(dtype)
        y, dx = _run(x, W, bias, g)
        assert y.dtype == dtype and dx.dtype == dtype
        # bias added in fp32 before the one rounding
        _check(y, torch.cat([x, torch.ones(M, 1, dtype=dtype)], 1), torch.cat([W, bias[:, None]], 1).T, dtype)
        _check(dx, g, W, dtype)


@needs_avx512
@pytest.mark.parametrize("dtype", _dtypes())
def test_kernels_agree_with_the_blas_path_and_threads(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(7)
    N, K = 72, 512
    W = torch.randn(N, K, generator=gen).to(dtype)
    x = torch.randn(5, K, generator=gen).to(dtype)
    g = torch.randn(5, N, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(x, W, None, g)
        torch.set_num_threads(max(2, threads))
        two = _run(x, W, None, g)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)  # each output element is summed by one task, in one order
    monkeypatch.setenv("PEFTX_CPU_ISA", "scalar")
    blas = _run(x, W, None, g)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=2 ** -7)
    for a, b in zip(two, blas):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_the_kernels_skip_take_the_blas(dtype):
    # K not a multiple of 32 / 64 / 128, a non-contiguous weight (a transposed view), fp16, more
    # tokens: all go through at::mm and still give the product.
    gen = torch.Generator().manual_seed(3)
    for N, K, M, transposed in [(10, 100, 3, False), (10, 96, 3, False), (12, 256, 2, True), (16, 128, 40, False)]:
        W = torch.randn(K, N, generator=gen).to(dtype).t() if transposed else torch.randn(N, K, generator=gen).to(dtype)
        x = torch.randn(M, K, generator=gen).to(dtype)
        g = torch.randn(M, N, generator=gen).to(dtype)
        y, dx = _run(x, W, None, g)
        _check(y, x, W.T, dtype)
        _check(dx, g, W, dtype)
