"""The fp32 rank-r kernels of the CPU LoRA ops (csrc/lora/cpu/rank_f32*): u = D(x) A^T and y += s u B^T in
the forward, gBs = s g B, dB = g^T (s u), dA = gBs^T D(x) and dx += D^T(gBs A) in the backward, against a
float64 reference that rounds at the same points (u and gBs in fp32), over ranks (odd, padded to 4, the
largest the kernels take, and beyond it), odd token and feature counts, dropout on and off, with and
without dx; and against the BLAS paths the ops take under PEFTX_CPU_ISA=avx2."""

import pytest
import torch

import peftx
from peftx.ops import lora as ops
from peftx.ops.reference import dropout_keep_ref, lora_dropout_ref

pytestmark = pytest.mark.skipif(not peftx._native._C.lora_rank_f32_supported(),
                                reason="needs a CPU with AVX-512 (the kernels under test)")

MAX_RANK = peftx._native._C.lora_rank_f32_max_rank()


def _close(got, want, rtol=2e-6):
    # fp32 sums of up to ~1000 terms in another order: a few ulps of each value, and of the largest
    # one for values that cancel to near 0.
    got, want = got.double(), want.double()
    scale = max(1e-30, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


def _reference(x, W, A, B, g, s, p, seed):
    """u, y, dx, dA, dB of the op with the op's rounding points, sums in float64."""
    xd = lora_dropout_ref(x, p, seed).double()  # fp32(x * scale), as the kernels
    u = (xd @ A.double().t()).float()
    y = (x.double() @ W.double().t()).float().double() + s * (u.double() @ B.double().t())
    gBs = ((g.double() @ B.double()).float() * s).double()
    keep = dropout_keep_ref(seed, x.shape[0], x.shape[1], p, x.device) if p else torch.ones_like(xd, dtype=torch.bool)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()
    dx = (g.double() @ W.double()).float().double() + torch.where(keep, (gBs @ A.double()) * scale, 0.0)
    dA = gBs.t() @ xd
    dB = g.double().t() @ (u * s).double()
    return u, y, dx, dA, dB


@pytest.mark.parametrize("R", [1, 3, 7, 12, MAX_RANK, MAX_RANK + 1])
# (1101, 700): the backward's column chunks shrink to 128 columns (the packed rows fill half of L2)
@pytest.mark.parametrize("M,K", [(1, 16), (2, 37), (5, 100), (33, 263), (200, 1000), (1101, 700)])
@pytest.mark.parametrize("N", [24, 41, 130])  # 16- and 64-output expand tiles with tails
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rank_kernels_match_reference(R, M, K, N, p):
    torch.manual_seed(R * 1000 + M * 10 + K + N)
    x = torch.randn(M, K)
    W = torch.randn(N, K) / K ** 0.5
    A = torch.randn(R, K) / K ** 0.5
    B = torch.randn(N, R)
    g = torch.randn(M, N)
    x[x.abs() < 0.05] = 0.0  # genuine zeros: kept zeros must not read as dropped
    seed = 0x5EED0000 + R
    u_ref, y_ref, dx_ref, dA_ref, dB_ref = _reference(x, W, A, B, g, 0.75, p, seed)
    y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 0.75, p, seed)
    _close(u, u_ref)
    _close(y, y_ref)
    dx, dA, dB = ops.lora_linear_bwd(g, x, u_ref, W, None, None, 64, A, B, 0.75, p, seed, True)
    _close(dx, dx_ref)
    _close(dA, dA_ref)
    _close(dB, dB_ref)
    _, dA_only, dB_only = ops.lora_linear_bwd(g, x, u_ref, W, None, None, 64, A, B, 0.75, p, seed, False)
    assert torch.equal(dA_only, dA) and torch.equal(dB_only, dB)


def test_dropped_elements_leave_dx_untouched():
    # Where the mask drops an element, dx is the base gradient exactly (NaN and inf in A's padded
    # ranks or x's dropped elements must not leak either).
    torch.manual_seed(5)
    M, K, N, R = 37, 200, 50, 5
    x, W = torch.randn(M, K), torch.randn(N, K) / K ** 0.5
    A, B, g = torch.randn(R, K) / K ** 0.5, torch.randn(N, R), torch.randn(M, N)
    seed, p = 99, 0.4
    keep = dropout_keep_ref(seed, M, K, p, x.device)
    x[~keep] = float("nan")
    y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 1.0, p, seed)
    assert torch.isfinite(u).all()
    dx, dA, _ = ops.lora_linear_bwd(g, x, u, W, None, None, 64, A, B, 1.0, p, seed, True)
    base = g @ W
    assert torch.equal(dx[~keep], base[~keep])
    assert torch.isfinite(dA).all()


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_kernels_agree_with_the_blas_paths(monkeypatch, p):
    # The same op under PEFTX_CPU_ISA=avx2 runs at::mm for every rank-r product.
    torch.manual_seed(3)
    M, K, N, R = 64, 384, 96, 16
    x, W = torch.randn(M, K), torch.randn(N, K) / K ** 0.5
    A, B = torch.randn(R, K) / K ** 0.5, torch.randn(N, R)
    g = torch.randn(M, N)
    runs = {}
    for isa in ("default", "avx2"):
        if isa == "avx2":
            monkeypatch.setenv("PEFTX_CPU_ISA", "avx2")
            assert not peftx._native._C.lora_rank_f32_supported()
        y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 1.5, p, 11)
        runs[isa] = (u, y) + ops.lora_linear_bwd(g, x, u, W, None, None, 64, A, B, 1.5, p, 11, True)
    for got, want in zip(runs["default"], runs["avx2"]):
        _close(got, want, rtol=1e-5)
