"""peftx::dense_lora_row_norm (DoRA's weight norm over a dense base) against its pure-torch reference:
weight and adapter dtypes, odd / tail in_features, ranks 0-40 (the kernel's rank groups of 4), row
counts around its 4-row tile, non-contiguous inputs, both CPU paths (the AVX-512 tile and the BLAS
row blocks), thread counts, the emulated CUDA grid, opcheck, torch.compile, bad input, and the DoRA
layer's use of it."""

import pytest
import torch

import peftx
from peftx import _native
from peftx.ops import dora as ops
from peftx.ops.reference import dense_lora_row_norm_ref
from peftx.tuners.lora import dora

emu = torch.ops.peftx_emulate
# The norm is an fp32 sum of squares of fp32 values W + s B A (16-bit W and adapters are widened
# exactly), against a float64 reference rounded once.
TOL = dict(atol=1e-5, rtol=2e-5)
SHAPES = [(1, 1, 1), (6, 42, 3), (8, 16, 8), (9, 17, 9), (123, 42, 8), (97, 130, 5), (64, 257, 16), (300, 77, 1),
          (33, 1000, 17), (15, 48, 40)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(out, inf, r, w_dtype=torch.float32, a_dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inf, generator=g).to(device, w_dtype)
    A = (torch.randn(r, inf, generator=g) / max(inf, 1) ** 0.5).to(device, a_dtype)
    B = torch.randn(out, r, generator=g).to(device, a_dtype)
    return W, A, B


def _cpu_paths():
    return ["avx512", "avx2"] if "avx512" in _native._C.cpu_isas() else ["avx2"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("a_dtype", DTYPES)
def test_matches_reference(device, shape, w_dtype, a_dtype):
    W, A, B = _inputs(*shape, w_dtype, a_dtype, device)
    for s in (0.0, 0.5, 2.0):
        got = ops.dense_lora_row_norm(W, A, B, s)
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        torch.testing.assert_close(got, dense_lora_row_norm_ref(W, A, B, s), **TOL)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_every_cpu_path(isa, w_dtype, monkeypatch):
    """AVX-512: the 4-row register tile; other instruction sets: row blocks through BLAS."""
    if isa not in _native._C.cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("PEFTX_CPU_ISA", isa)
    for shape in [(50, 333, 7), (17, 4096, 16), (3, 5, 0)]:
        W, A, B = _inputs(*shape, w_dtype)
        torch.testing.assert_close(ops.dense_lora_row_norm(W, A, B, 1.5), dense_lora_row_norm_ref(W, A, B, 1.5), **TOL)


def test_rows_are_independent_of_the_tile():
    """A row's norm does not depend on which other rows share its tile, nor on how many there are."""
    W, A, B = _inputs(21, 200, 12)
    full = ops.dense_lora_row_norm(W, A, B, 0.8)
    for o0, o1 in [(0, 1), (3, 11), (8, 21), (13, 14)]:
        assert torch.equal(ops.dense_lora_row_norm(W[o0:o1], A, B[o0:o1], 0.8), full[o0:o1]), (o0, o1)


def test_zero_adapter_is_the_weight_row_norm(device):
    W, A, B = _inputs(40, 96, 4, device=device)
    got = ops.dense_lora_row_norm(W, A, torch.zeros_like(B), 1.0)
    torch.testing.assert_close(got, torch.linalg.vector_norm(W.double(), dim=1).float(), **TOL)


def test_non_contiguous_inputs(device):
    W, A, B = _inputs(24, 70, 6, device=device)
    Wt = W.t().contiguous().t()  # same values, column-major (a GPT-2 Conv1D weight seen as [out, in])
    At = A.t().contiguous().t()
    Bs = torch.randn(24, 12, device=device)[:, ::2]
    assert not Wt.is_contiguous() and not At.is_contiguous() and not Bs.is_contiguous()
    torch.testing.assert_close(ops.dense_lora_row_norm(Wt, At, Bs, 0.7), dense_lora_row_norm_ref(W, A, Bs, 0.7), **TOL)


def test_threads_do_not_change_the_result():
    W, A, B = _inputs(257, 512, 8, torch.bfloat16)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.dense_lora_row_norm(W, A, B, 1.0)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, ops.dense_lora_row_norm(W, A, B, 1.0))


def test_special_values_propagate():
    W, A, B = _inputs(16, 64, 4)
    W[3, 5] = float("nan")
    W[9, 0] = float("inf")
    got = ops.dense_lora_row_norm(W, A, B, 1.0)
    assert got[3].isnan() and got[9].isinf()
    keep = [o for o in range(16) if o not in (3, 9)]
    torch.testing.assert_close(got[keep], dense_lora_row_norm_ref(W, A, B, 1.0)[keep], **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_emulated_cuda_grid(shape, w_dtype):
    W, A, B = _inputs(*shape, w_dtype, torch.bfloat16)
    got = emu.dense_lora_row_norm_kernel(W, A, B, 1.25)
    torch.testing.assert_close(got, dense_lora_row_norm_ref(W, A, B, 1.25), **TOL)


def test_empty(device):
    W, A, B = _inputs(0, 16, 2, device=device)
    assert ops.dense_lora_row_norm(W, A, B, 1.0).shape == (0,)
    W, A, B = _inputs(5, 0, 2, device=device)
    assert torch.equal(ops.dense_lora_row_norm(W, A, B, 1.0), torch.zeros(5, device=device))


def test_opcheck_and_compile(device):
    W, A, B = _inputs(12, 40, 4, torch.bfloat16, device=device)
    args = (W, A, B, 0.5)
    torch.library.opcheck(torch.ops.peftx.dense_lora_row_norm.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    f = torch.compile(lambda *a: ops.dense_lora_row_norm(*a) * 2, fullgraph=True)
    torch.testing.assert_close(f(*args), 2 * dense_lora_row_norm_ref(W, A, B, 0.5), **TOL)


def test_bad_input_names_the_argument(device):
    W, A, B = _inputs(8, 32, 4, device=device)
    f = torch.ops.peftx.dense_lora_row_norm
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        f(W[0], A, B, 1.0)
    with pytest.raises(RuntimeError, match="weight must be float32, float16 or bfloat16"):
        f(W.double(), A, B, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_A must have shape \[r, 32\]"):
        f(W, A[:, :30], B, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[8, 4\]"):
        f(W, A, B[:, :3], 1.0)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[8, 4\]"):
        f(W, A, B[:7], 1.0)
    with pytest.raises(RuntimeError, match="lora_A must be float32"):
        f(W, A.double(), B, 1.0)
    with pytest.raises(RuntimeError, match="lora_B must be float32"):
        f(W, A, B.to(torch.int32), 1.0)


def test_dora_layer_norm_uses_the_op_and_matches_the_torch_formula(monkeypatch):
    """LoraLinear's DoRA norm (fp32 / bf16 base) comes from the op; an fp64 base keeps the torch formula."""
    calls = []
    real = ops.dense_lora_row_norm
    monkeypatch.setattr(ops, "dense_lora_row_norm", lambda *a: calls.append(1) or real(*a))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base = torch.nn.Linear(96, 40).to(dtype)
        layer = peftx.LoraLinear(base, r=4, lora_alpha=8, use_dora=True)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        calls.clear()
        got = layer._dora_norm("default")
        assert len(calls) == (0 if dtype == torch.float64 else 1), dtype
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        want = torch.linalg.vector_norm(base.weight.double() + 2.0 * (B.double() @ A.double()), dim=1)
        torch.testing.assert_close(got.double(), want, atol=1e-5 if dtype != torch.float64 else 1e-12, rtol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_cuda_matches_emulated_grid(w_dtype):
    W, A, B = _inputs(300, 257, 8, w_dtype, device="cuda")
    got = ops.dense_lora_row_norm(W, A, B, 0.75).cpu()
    emulated = emu.dense_lora_row_norm_kernel(W.cpu(), A.cpu(), B.cpu(), 0.75)
    torch.testing.assert_close(got, emulated, atol=1e-6, rtol=1e-6)
