"""The bf16 rank-r kernels of the CPU LoRA ops (csrc/lora/cpu/rank_bf16*): u = D(x) A^T and y += s u B^T in
the forward, gBs = s g B, dB = s g^T u, dA = gBs^T D(x) and dx += D^T(gBs A) in the backward, against a float64 reference that rounds at the
same points (D(x), u and gBs = s g B in bf16), over ranks (odd, the largest the backward kernel takes,
and beyond it), odd token and feature counts, dropout on and off, with and without dx; and against
the BLAS paths the ops take under PEFTX_CPU_ISA=avx2."""

import pytest
import torch

import peftx
from peftx.ops import lora as ops
from peftx.ops.reference import dropout_keep_ref, lora_dropout_ref

pytestmark = pytest.mark.skipif(not peftx._native._C.lora_rank_bf16_supported(),
                                reason="needs a CPU with AVX-512 BF16 (the kernels under test)")

MAX_RANK = peftx._native._C.lora_rank_bf16_max_rank()
BF16 = torch.bfloat16


def _close(got, want, ulps=4):
    # `ulps` x 2^-8 of each value (bf16 keeps 8 significant bits), and of the largest one for values that cancel to near 0.
    got, want = got.double(), want.double()
    scale = max(1e-30, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=ulps * 2.0 ** -8, atol=ulps * 2.0 ** -8 * scale * 0.05)


def _reference(x, W, A, B, g, s, p, seed):
    """u, y, dx, dA, dB of the op with the op's rounding points, sums in float64."""
    xd = lora_dropout_ref(x, p, seed).double()  # rounded to bf16 exactly as the kernels round it
    u = (xd @ A.double().t()).to(BF16)
    y = ((x.double() @ W.double().t()).to(BF16).double() + s * (u.double() @ B.double().t()))
    gBs = ((g.double() @ B.double()).to(BF16).float() * s).to(BF16).double()
    keep = dropout_keep_ref(seed, x.shape[0], x.shape[1], p, x.device) if p else torch.ones_like(xd, dtype=torch.bool)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()
    dx = (g.double() @ W.double()).to(BF16).double() + torch.where(keep, (gBs @ A.double()) * scale, 0.0)
    dA = gBs.t() @ xd
    dB = g.double().t() @ (u.float() * s).to(BF16).double()
    return u, y, dx, dA, dB


@pytest.mark.parametrize("R", [1, 3, 7, 16, MAX_RANK + 1, 24])
# (1101, 700): the backward's column chunks shrink to 240 columns (the packed rows fill half of L2)
@pytest.mark.parametrize("M,K", [(1, 16), (2, 37), (5, 100), (33, 263), (200, 1000), (1101, 700)])
@pytest.mark.parametrize("N", [24, 41, 130])  # 16- and 64-output expand tiles with tails; odd N (g B pairs)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rank_kernels_match_reference(R, M, K, N, p):
    torch.manual_seed(R * 1000 + M * 10 + K + N)
    x = torch.randn(M, K).to(BF16)
    W = (torch.randn(N, K) / K ** 0.5).to(BF16)
    A = (torch.randn(R, K) / K ** 0.5).to(BF16)
    B = torch.randn(N, R).to(BF16)
    g = torch.randn(M, N).to(BF16)
    x[x.abs() < 0.05] = 0.0  # genuine zeros: kept zeros must not read as dropped
    seed = 0x5EED0000 + R
    u_ref, y_ref, dx_ref, dA_ref, dB_ref = _reference(x, W, A, B, g, 0.75, p, seed)
    y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 0.75, p, seed)
    # One rounding of an fp32 sum: at most one ulp off the exact one (an ulp is 2^-8 .. 2^-7 of a value).
    _close(u, u_ref, ulps=2.0)
    _close(y, y_ref)
    dx, dA, dB = ops.lora_linear_bwd(g, x, u_ref, W, None, None, 64, A, B, 0.75, p, seed, True)
    _close(dx, dx_ref)
    _close(dA, dA_ref)
    _close(dB, dB_ref)
    _, dA_only, dB_only = ops.lora_linear_bwd(g, x, u_ref, W, None, None, 64, A, B, 0.75, p, seed, False)
    assert torch.equal(dA_only, dA) and torch.equal(dB_only, dB)


@pytest.mark.parametrize("R", [4, 17])
def test_fp32_adapters_take_the_kernels_and_get_fp32_gradients(R):
    torch.manual_seed(R)
    M, K, N = 9, 70, 12
    x = torch.randn(M, K).to(BF16)
    W = torch.randn(N, K).to(BF16)
    A, B = torch.randn(R, K) / K ** 0.5, torch.randn(N, R)
    g = torch.randn(M, N).to(BF16)
    y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 2.0, 0.2, 7)
    dx, dA, dB = ops.lora_linear_bwd(g, x, u, W, None, None, 64, A, B, 2.0, 0.2, 7, True)
    assert (dx.dtype, dA.dtype, dB.dtype) == (BF16, torch.float32, torch.float32)
    _, _, dx_ref, dA_ref, dB_ref = _reference(x, W, A.to(BF16), B.to(BF16), g, 2.0, 0.2, 7)
    _close(dx, dx_ref)
    _close(dA, dA_ref)
    _close(dB, dB_ref)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_kernels_agree_with_the_blas_paths(monkeypatch, p):
    # The same op under PEFTX_CPU_ISA=avx2 runs at::mm for every rank-r product (and the scalar mask).
    torch.manual_seed(3)
    M, K, N, R = 64, 384, 96, 16
    x, W = torch.randn(M, K).to(BF16), (torch.randn(N, K) / K ** 0.5).to(BF16)
    A, B = (torch.randn(R, K) / K ** 0.5).to(BF16), torch.randn(N, R).to(BF16)
    g = torch.randn(M, N).to(BF16)
    runs = {}
    for isa in ("default", "avx2"):
        if isa == "avx2":
            monkeypatch.setenv("PEFTX_CPU_ISA", "avx2")
            assert not peftx._native._C.lora_rank_bf16_supported()
        y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 1.5, p, 11)
        runs[isa] = (u, y) + ops.lora_linear_bwd(g, x, u, W, None, None, 64, A, B, 1.5, p, 11, True)
    for got, want in zip(runs["default"], runs["avx2"]):
        _close(got, want, ulps=8)
