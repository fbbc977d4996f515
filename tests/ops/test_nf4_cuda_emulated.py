"""The NF4 CUDA kernels' per-thread functions, run over their whole grid on the CPU
(peftx_emulate ops, csrc/nf4/nf4_emulate.cpp), against the references."""

import pytest
import torch

import peftx
from peftx.ops.reference import (DYNAMIC_CODE, NF4_CODE, nf4_dequantize_ref, nf4_double_dequantize_ref,
                                 nf4_double_quantize_ref, nf4_quantize_ref)

emu = torch.ops.peftx_emulate
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 42), (123, 42), (1, 1), (300, 77), (97, 130)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_quantize_and_dequantize_grids(dtype, shape, blocksize):
    w = torch.randn(shape, dtype=dtype)
    packed, absmax = emu.nf4_quantize_kernel(w, blocksize)
    rp, ra = nf4_quantize_ref(w, blocksize)
    assert torch.equal(packed, rp) and torch.equal(absmax, ra)
    for out in DTYPES:
        want = nf4_dequantize_ref(packed, absmax, NF4_CODE, blocksize, (w.numel(),), out)
        # the byte-per-thread kernel, and the 8-elements-per-thread one (odd tails included)
        assert torch.equal(emu.nf4_dequantize_kernel(packed, absmax, NF4_CODE, blocksize, w.numel(), out), want)
        assert torch.equal(emu.nf4_dequantize8_kernel(packed, absmax, NF4_CODE, blocksize, w.numel(), out), want)


@pytest.mark.parametrize("n", [1, 256, 257, 3000])
def test_double_quant_grids(n):
    absmax = torch.rand(n) * 4
    rq, rn, ro = nf4_double_quantize_ref(absmax, DYNAMIC_CODE, 256)
    q, nested = emu.nf4_double_quantize_kernel((absmax - ro).contiguous(), DYNAMIC_CODE, 256)
    assert torch.equal(q, rq) and torch.equal(nested, rn)
    got = emu.nf4_double_dequantize_kernel(q, nested, DYNAMIC_CODE, ro, 256)
    assert torch.equal(got, nf4_double_dequantize_ref(q, nested, DYNAMIC_CODE, ro, 256))


def test_fp16_conversion_exhaustive():
    # The host half<->float conversion the emulation uses (device code uses the intrinsics).
    bits = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = torch.isfinite(bits)
    got = emu.nf4_dequantize_kernel(*_identity_state(bits.float()), torch.float16)[::32]
    assert torch.equal(got[finite].view(torch.int16), bits[finite].view(torch.int16))
    # float -> half rounding (nearest even, subnormals, overflow) against torch on random floats
    f = torch.cat([torch.randn(100000) * 10.0 ** torch.randint(-9, 6, (100000,)).float(),
                   torch.tensor([65504.0, 65519.0, 65520.0, 1e-8, 2.0 ** -25, 2.0 ** -24 * 1.5])])
    got = emu.nf4_dequantize_kernel(*_identity_state(f), torch.float16)[::32]
    assert torch.equal(got.view(torch.int16), f.half().view(torch.int16))
    got = emu.nf4_dequantize_kernel(*_identity_state(f), torch.bfloat16)[::32]
    assert torch.equal(got.view(torch.int16), f.bfloat16().view(torch.int16))


def _identity_state(values):
    # A "weight" whose decode is exactly `values` * 1: code [0, 1, ...] and absmax = values. One
    # element per block (blocksize 32, 31 padding elements) keeps every value representable.
    n = values.numel()
    code = torch.zeros(16)
    code[1] = 1.0
    packed = torch.zeros(n * 16, dtype=torch.uint8)
    packed[::16] = 0x10
    absmax = values.float().contiguous()
    return packed, absmax, code, 32, n * 32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("M,N,K", [(1, 42, 128), (3, 64, 64), (5, 7, 8), (16, 33, 264), (6, 9, 40)])
def test_gemv_grid(dtype, blocksize, M, N, K):
    # K % 8 == 0 (the kernel's requirement); blocks straddle rows when K % blocksize != 0; row groups
    # of 4 with a partial last group (M = 3, 5, 6).
    w = peftx.nf4_quantize(torch.randn(N, K), blocksize=blocksize)
    absmax = w.absmax_fp32()
    wd = nf4_dequantize_ref(w.packed, absmax, w.code, blocksize, (N, K), torch.float32)
    x = torch.randn(M, K).to(dtype)
    y = emu.nf4_gemv_kernel(x, w.packed, absmax, w.code, blocksize, N)
    torch.testing.assert_close(y, x.float() @ wd.T, atol=1e-4, rtol=1e-4)


def test_gemv_grid_rejects_unaligned_rows():
    w = peftx.nf4_quantize(torch.randn(4, 12))
    with pytest.raises(RuntimeError, match="in_features % 8"):
        emu.nf4_gemv_kernel(torch.randn(2, 12), w.packed, w.absmax_fp32(), w.code, 64, 4)
