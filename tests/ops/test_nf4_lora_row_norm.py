"""peftx::nf4_lora_row_norm (DoRA's weight norm over an NF4 base) against its pure-torch reference:
shapes with odd / tail in_features, blocksizes, adapter dtypes, non-contiguous adapters, every CPU
instruction set (and on AVX-512 both the register tile and the row buffer), the emulated CUDA grid,
opcheck, torch.compile, bad input."""

import pytest
import torch

import peftx
from peftx.ops import dora as ops
from peftx.ops.reference import NF4_CODE, nf4_lora_row_norm_ref

emu = torch.ops.peftx_emulate
# The norm is an fp32 sum of squares; adapters given in 16-bit are widened exactly, so the
# tolerance does not depend on the adapter dtype.
TOL = dict(atol=1e-5, rtol=2e-5)
# in_features % 32 == 0 (the AVX-512 tile of 4 rows x 32 columns, row counts around it, ranks past
# its groups of 4) and not (a row buffer per thread).
SHAPES = [(1, 1, 1), (6, 42, 3), (123, 42, 8), (97, 130, 5), (64, 257, 16), (300, 77, 1), (33, 1000, 4),
          (37, 64, 5), (9, 96, 17), (4, 4096, 16), (1, 32, 40), (6, 320, 0)]


def _state(out, inf, blocksize, double_quant, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inf, generator=g).to(device)
    q = peftx.NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant)
    return q


def _adapter(out, inf, r, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, inf, generator=g) / inf ** 0.5).to(device, dtype)
    B = torch.randn(out, r, generator=g).to(device, dtype)
    return A, B


def _ref(q, A, B, s):
    return nf4_lora_row_norm_ref(q.packed, q.absmax_fp32(), q.code, q.blocksize, A, B, s)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, shape, blocksize, dtype):
    out, inf, r = shape
    q = _state(out, inf, blocksize, double_quant=blocksize == 64, device=device)
    A, B = _adapter(out, inf, r, dtype, device)
    for s in (0.0, 0.5, 2.0):
        got = ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, blocksize, A, B, s)
        assert got.dtype == torch.float32 and got.shape == (out,)
        torch.testing.assert_close(got, _ref(q, A, B, s), **TOL)


def test_zero_adapter_is_the_dequantized_row_norm(device):
    q = _state(40, 96, 64, True, device)
    A, B = _adapter(40, 96, 4, torch.float32, device)
    got = ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 64, A, torch.zeros_like(B), 1.0)
    torch.testing.assert_close(got, torch.linalg.vector_norm(q.dequantize(torch.float32).double(), dim=1).float(), **TOL)


def test_non_contiguous_adapters(device):
    q = _state(24, 70, 64, False, device)
    A, B = _adapter(24, 70, 6, torch.float32, device)
    At = A.t().contiguous().t()  # same values, column-major
    Bs = torch.randn(24, 12, device=device)[:, ::2]  # strided
    assert not At.is_contiguous() and not Bs.is_contiguous()
    got = ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 64, At, Bs, 0.7)
    torch.testing.assert_close(got, _ref(q, A, Bs, 0.7), **TOL)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_cpu_instruction_set(isa, monkeypatch):
    from peftx import _native
    if isa not in _native._C.cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("PEFTX_CPU_ISA", isa)
    for inf in (333, 320):  # the row buffer; on AVX-512 the register tile
        q = _state(50, inf, 64, True)
        A, B = _adapter(50, inf, 7, torch.float32, "cpu")
        got = ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 64, A, B, 1.5)
        torch.testing.assert_close(got, _ref(q, A, B, 1.5), **TOL)


def test_tile_rows_are_independent_of_the_tile():
    """A row's norm does not depend on which other rows share its 4-row tile, nor on how many there are."""
    q = _state(21, 256, 32, False)
    A, B = _adapter(21, 256, 12, torch.float32, "cpu")
    full = ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 32, A, B, 0.8)
    w = q.dequantize(torch.float32)
    for o0, o1 in [(0, 1), (3, 11), (8, 21), (13, 14)]:
        qs = peftx.NF4Weight.quantize(w[o0:o1], blocksize=32, double_quant=False)
        assert torch.equal(qs.dequantize(torch.float32), w[o0:o1])  # the same weight, requantized exactly
        got = ops.nf4_lora_row_norm(qs.packed, qs.absmax_fp32(), qs.code, 32, A, B[o0:o1], 0.8)
        assert torch.equal(got, full[o0:o1]), (o0, o1)


def test_threads_do_not_change_the_result():
    q = _state(257, 512, 64, True)
    A, B = _adapter(257, 512, 8, torch.float32, "cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 64, A, B, 1.0)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 64, A, B, 1.0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_emulated_cuda_grid(shape, blocksize):
    out, inf, r = shape
    q = _state(out, inf, blocksize, double_quant=True)
    A, B = _adapter(out, inf, r, torch.bfloat16, "cpu")
    got = emu.nf4_lora_row_norm_kernel(q.packed, q.absmax_fp32(), q.code, blocksize, A, B, 1.25)
    torch.testing.assert_close(got, _ref(q, A, B, 1.25), **TOL)


def test_empty_and_rank_zero(device):
    q = _state(0, 16, 64, False, device)
    A, B = _adapter(0, 16, 2, torch.float32, device)
    assert ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 64, A, B, 1.0).shape == (0,)


def test_opcheck_and_compile(device):
    q = _state(12, 40, 64, True, device)
    A, B = _adapter(12, 40, 4, torch.float32, device)
    args = (q.packed, q.absmax_fp32(), q.code, 64, A, B, 0.5)
    torch.library.opcheck(torch.ops.peftx.nf4_lora_row_norm.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    f = torch.compile(lambda *a: ops.nf4_lora_row_norm(*a) * 2, fullgraph=True)
    torch.testing.assert_close(f(*args), 2 * _ref(q, A, B, 0.5), **TOL)


def test_bad_input_names_the_argument(device):
    q = _state(8, 32, 64, False, device)
    A, B = _adapter(8, 32, 4, torch.float32, device)
    f = torch.ops.peftx.nf4_lora_row_norm
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        f(q.packed, q.absmax_fp32(), q.code, 64, A, B[:, :3], 1.0)
    with pytest.raises(RuntimeError, match="lora_A must be 2-D"):
        f(q.packed, q.absmax_fp32(), q.code, 64, A[0], B, 1.0)
    with pytest.raises(RuntimeError, match="packed must hold"):
        f(q.packed, q.absmax_fp32(), q.code, 64, A[:, :30], B, 1.0)
    with pytest.raises(RuntimeError, match="blocksize"):
        f(q.packed, q.absmax_fp32(), q.code, 48, A, B, 1.0)
    with pytest.raises(RuntimeError, match="lora_A must be float32"):
        f(q.packed, q.absmax_fp32(), q.code, 64, A.double(), B, 1.0)
    with pytest.raises(RuntimeError, match="code must have 16"):
        f(q.packed, q.absmax_fp32(), NF4_CODE[:8].to(device), 64, A, B, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_emulated_grid():
    q = _state(300, 257, 64, True, "cuda")
    A, B = _adapter(300, 257, 8, torch.float32, "cuda")
    got = ops.nf4_lora_row_norm(q.packed, q.absmax_fp32(), q.code, 64, A, B, 0.75).cpu()
    qc = q.to("cpu")
    emulated = emu.nf4_lora_row_norm_kernel(qc.packed, qc.absmax_fp32(), qc.code, 64, A.cpu(), B.cpu(), 0.75)
    torch.testing.assert_close(got, emulated, atol=1e-6, rtol=1e-6)
