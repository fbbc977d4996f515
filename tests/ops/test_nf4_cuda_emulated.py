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
        got = emu.nf4_dequantize_kernel(packed, absmax, NF4_CODE, blocksize, w.numel(), out)
        assert torch.equal(got, nf4_dequantize_ref(packed, absmax, NF4_CODE, blocksize, (w.numel(),), out))


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
@pytest.mark.parametrize("M,N,K", [(1, 42, 123), (3, 64, 64), (5, 7, 1), (16, 33, 257)])
def test_gemv_grids(dtype, M, N, K):
    w = peftx.nf4_quantize(torch.randn(N, K))
    absmax = w.absmax_fp32()
    wd = nf4_dequantize_ref(w.packed, absmax, w.code, 64, (N, K), torch.float32)
    x = torch.randn(M, K).to(dtype)
    y = emu.nf4_gemv_kernel(x, w.packed, absmax, w.code, 64, N)
    torch.testing.assert_close(y, x.float() @ wd.T, atol=1e-4, rtol=1e-4)
    g = torch.randn(M, N).to(dtype)
    dx = emu.nf4_gemv_t_kernel(g, w.packed, absmax, w.code, 64, K)
    torch.testing.assert_close(dx, g.float() @ wd, atol=1e-4, rtol=1e-4)
