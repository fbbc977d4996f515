"""peftx LoRA ops against their pure-torch references: the Philox dropout mask, forward and gradients
over dense and NF4 bases (dtypes x odd shapes x non-contiguous x bias x dropout), gradcheck in float64,
opcheck, torch.compile, autocast, the mixed-adapter op, the emulated CUDA grids, bad input."""

import pytest
import torch

import peftx
from peftx.ops import lora as ops
from peftx.ops.reference import (dropout_keep_ref, dropout_threshold_ref, lora_dropout_ref, lora_linear_ref,
                                 lora_multi_ref, philox4x32_10_ref)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances against the fp32 reference: the kernels round x, W, A, B products to the dtype at the
# same points as a dtype-native LoRA layer (u and the LoRA term), so errors are a few ulps of the
# dtype times sqrt(K) on O(1) data.
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=2.5e-1, rtol=5e-2)}
GRAD_TOL = {torch.float32: dict(atol=5e-4, rtol=5e-4), torch.float16: dict(atol=6e-2, rtol=3e-2),
            torch.bfloat16: dict(atol=5e-1, rtol=8e-2)}


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10.
    def run(c, k):
        return [int(w) for w in philox4x32_10_ref([torch.tensor([v]) for v in c], k)]
    assert run((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert run((m, m, m, m), (m, m)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_mask_statistics_and_kernel_agreement(p):
    keep = dropout_keep_ref(7, 300, 333, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # Rows and columns are not correlated: neighbouring rows agree at the Bernoulli rate.
    agree = (keep[1:] == keep[:-1]).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    # The CUDA per-thread function, run over its grid on the CPU, makes the same mask.
    ones = torch.ones(300, 333)
    xd = torch.ops.peftx_emulate.lora_dropout_kernel(ones, 7, p)
    assert torch.equal(xd != 0, keep)
    assert torch.equal(xd, lora_dropout_ref(ones, p, 7))
    # A thread takes one Philox block (8 elements): a count that is not a multiple of 8 ends mid-block.
    odd = torch.randn(5, 7)
    assert torch.equal(torch.ops.peftx_emulate.lora_dropout_kernel(odd, 9, p), lora_dropout_ref(odd, p, 9))


def test_dropout_threshold_resolution():
    # 16-bit uniforms: p resolves to multiples of 2^-16, and a positive p never rounds to no dropout.
    assert [dropout_threshold_ref(p) for p in (0.0, 1e-9, 0.05, 0.5, 0.9999999)] == [0, 1, 3276, 32768, 65535]
    p, seed = 1e-9, 3
    keep = dropout_keep_ref(seed, 64, 4096, p)
    assert 0 < int((~keep).sum()) < 20  # about 2^-16 of 262144 elements: 4
    x = torch.ones(64, 4096)
    assert torch.equal(torch.ops.peftx_emulate.lora_dropout_kernel(x, seed, p) != 0, keep)
    A = torch.randn(2, 4096)
    _, u = ops.lora_linear_fwd(x, torch.zeros(3, 4096), None, None, 64, None, A, torch.zeros(3, 2), 1.0, p, seed)
    torch.testing.assert_close(u, lora_dropout_ref(x, p, seed) @ A.t(), atol=1e-3, rtol=1e-5)


def _base(kind, out_f, in_f, dtype, device):
    w = torch.randn(out_f, in_f, device=device) / in_f ** 0.5
    if kind == "dense":
        return dict(weight=w.to(dtype), absmax=None, code=None, blocksize=64), w.to(dtype)
    q = peftx.nf4_quantize(w, blocksize=64)
    return dict(weight=q.packed, absmax=q.absmax_fp32(), code=q.code, blocksize=64), q.dequantize(torch.float32)


def _call(x, base, bias, A, B, s, p, seed):
    return ops.lora_linear_fwd(x, base["weight"], base["absmax"], base["code"], base["blocksize"], bias, A, B, s,
                               p, seed)


CASES = [((3, 40), 24, 4), ((2, 3, 123), 41, 8), ((1, 7), 5, 1), ((0, 16), 8, 2), ((37, 96), 130, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out_f,r", CASES)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_reference(device, dtype, shape, out_f, r, kind, p, bias):
    torch.manual_seed(sum(shape) * 7 + out_f * 13 + r + int(p * 10) + bias + 1000 * (kind == "nf4"))
    in_f = shape[-1]
    base, w_ref = _base(kind, out_f, in_f, dtype, device)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, in_f, device=device) / in_f ** 0.5).to(dtype).requires_grad_()
    B = torch.randn(out_f, r, device=device).to(dtype).requires_grad_()
    b = torch.randn(out_f, device=device, dtype=dtype, requires_grad=True) if bias else None
    y, u = _call(x, base, b, A, B, 0.7, p, 1234)
    assert y.shape == (*shape[:-1], out_f) and y.dtype == dtype and u.shape == (x.numel() // in_f, r)
    ref = lora_linear_ref(x, w_ref, b, A, B, 0.7, p, 1234)
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])
    # u is D(x) A^T with the reference mask.
    torch.testing.assert_close(u.float(), lora_dropout_ref(x.detach(), p, 1234).reshape(-1, in_f).float()
                               @ A.detach().float().t(), **TOL[dtype])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, A, B] + ([b] if bias else []), g)
    xr, Ar, Br = (t.detach().float().requires_grad_() for t in (x, A, B))
    br = b.detach().float().requires_grad_() if bias else None
    want = torch.autograd.grad(lora_linear_ref(xr, w_ref.float(), br, Ar, Br, 0.7, p, 1234),
                               [xr, Ar, Br] + ([br] if bias else []), g.float())
    for got_t, want_t in zip(got, want):
        assert got_t.dtype == dtype
        # Rounding errors scale with the gradients' size (s g B is O(sqrt(r)) here, not O(1)).
        scale = max(1.0, want_t.abs().max().item()) if want_t.numel() else 1.0
        tol = GRAD_TOL[dtype]
        torch.testing.assert_close(got_t.float(), want_t, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_under_low_precision_input(device, dtype):
    # fp32 master adapters with a 16-bit layer: products in x's dtype, adapter gradients in fp32.
    base, w_ref = _base("dense", 24, 40, dtype, device)
    x = torch.randn(6, 40, device=device, dtype=dtype, requires_grad=True)
    A = (torch.randn(4, 40, device=device) / 40 ** 0.5).requires_grad_()
    B = torch.randn(24, 4, device=device, requires_grad=True)
    y, u = _call(x, base, None, A, B, 0.5, 0.1, 9)
    assert y.dtype == dtype and u.dtype == dtype
    g = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, [x, A, B], g)
    assert dA.dtype == torch.float32 and dB.dtype == torch.float32
    xr = x.detach().float().requires_grad_()
    Ar, Br = A.detach().to(dtype).float().requires_grad_(), B.detach().to(dtype).float().requires_grad_()
    want = torch.autograd.grad(lora_linear_ref(xr, w_ref.float(), None, Ar, Br, 0.5, 0.1, 9), [xr, Ar, Br], g.float())
    for got_t, want_t in zip((dx, dA, dB), want):
        torch.testing.assert_close(got_t.float(), want_t, **GRAD_TOL[dtype])


def test_non_contiguous_inputs(device):
    base, w = _base("dense", 20, 48, torch.float32, device)
    x = torch.randn(6, 96, device=device)[:, ::2]
    A = torch.randn(48, 4, device=device).t()
    B = torch.randn(4, 20, device=device).t()
    assert not (x.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    weight = torch.randn(48, 20, device=device).t()
    base["weight"] = weight
    for p in (0.0, 0.25):
        y, _ = _call(x, base, None, A, B, 2.0, p, 99)
        torch.testing.assert_close(y, lora_linear_ref(x, weight, None, A, B, 2.0, p, 99), **TOL[torch.float32])


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(p, bias):
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None

    def f(x, W, A, B, *b):
        return ops.lora_linear_fwd(x, W, None, None, 64, b[0] if b else None, A, B, 0.5, p, 42)[0]
    assert torch.autograd.gradcheck(f, (x, W, A, B) + ((b,) if bias else ()))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("wants", [("A",), ("x", "bias"), ("B", "bias"), ("x", "A", "B", "bias")])
def test_gradients_only_where_asked(kind, wants):
    # The autograd (C++) maps its optional tensor arguments (absmax, code, bias) to the graph's edges:
    # whichever subset asks for a gradient gets exactly the reference's, the others none.
    torch.manual_seed(3)
    base, weight = _base(kind, 10, 16, torch.float32, "cpu")
    t = {"x": torch.randn(5, 16), "A": torch.randn(3, 16), "B": torch.randn(10, 3), "bias": torch.randn(10)}
    for k in wants:
        t[k].requires_grad_()
    g = torch.randn(5, 10)
    _call(t["x"], base, t["bias"], t["A"], t["B"], 1.5, 0.3, 8)[0].backward(g)
    ref = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    lora_linear_ref(ref["x"], weight, ref["bias"], ref["A"], ref["B"], 1.5, 0.3, 8).backward(g)
    for k, v in t.items():
        if k in wants:
            torch.testing.assert_close(v.grad, ref[k].grad, atol=1e-4, rtol=1e-4)
        else:
            assert v.grad is None


def test_backward_regenerates_the_forward_mask():
    # Saved for backward: x and u only. dA = s (g B)^T D(x) needs D's mask again; if backward drew a
    # different mask dA would not match the reference built from the forward's mask.
    torch.manual_seed(0)
    x = torch.randn(64, 200)
    W = torch.randn(30, 200)
    A = torch.randn(8, 200, requires_grad=True)
    B = torch.randn(30, 8, requires_grad=True)
    y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 1.0, 0.5, 2024)
    y.sum().backward()
    keep = dropout_keep_ref(2024, 64, 200, 0.5)
    want_dA = (torch.ones(64, 30) @ B.detach()).t() @ torch.where(keep, x * 2.0, 0.0)
    torch.testing.assert_close(A.grad, want_dA, atol=1e-3, rtol=1e-4)
    # A different seed gives a different mask (the seed is really used).
    _, u2 = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 1.0, 0.5, 2025)
    assert not torch.allclose(u, u2)


def test_saved_tensors_are_x_and_u_only():
    x = torch.randn(32, 64, requires_grad=True)
    W = torch.randn(48, 64)
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 1.0, 0.1, 5)
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() not in (x.data_ptr(), W.data_ptr())]
    assert big == [], f"saved a full-size tensor besides x and W: {[tuple(t.shape) for t in big]}"
    assert any(t.shape == (32, 4) for t in saved)


def test_opcheck(device):
    x = torch.randn(5, 24, device=device, requires_grad=True)
    W = torch.randn(12, 24, device=device)
    A = torch.randn(4, 24, device=device, requires_grad=True)
    B = torch.randn(12, 4, device=device, requires_grad=True)
    b = torch.randn(12, device=device, requires_grad=True)
    q = peftx.nf4_quantize(W)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    f = torch.ops.peftx.lora_linear_fwd.default
    for p in (0.0, 0.2):
        torch.library.opcheck(f, (x, W, None, None, 64, b, A, B, 0.5, p, 3), test_utils=tests)
        torch.library.opcheck(f, (x, q.packed, q.absmax_fp32(), q.code, 64, None, A, B, 0.5, p, 3), test_utils=tests)
        torch.library.opcheck(torch.ops.peftx.lora_linear_nf4dq_fwd.default,
                              (x, q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, 64, 256, b,
                               A, B, 0.5, p, 3), test_utils=tests)
        y, u = f(x, W, None, None, 64, b, A, B, 0.5, p, 3)
        torch.library.opcheck(torch.ops.peftx.lora_linear_bwd.default,
                              (torch.randn(5, 12, device=device), x.detach(), u, W, None, None, 64, A.detach(),
                               B.detach(), 0.5, p, 3, True), test_utils=tests[:3])
    ids = torch.tensor([0, -1, 1, 1, 0], device=device)
    torch.library.opcheck(torch.ops.peftx.lora_multi_fwd.default,
                          (x.detach(), torch.randn(5, 12, device=device), torch.randn(2, 4, 24, device=device),
                           torch.randn(2, 12, 4, device=device), torch.tensor([0.5, 2.0], device=device), ids),
                          test_utils=tests[:3])


def test_torch_compile_fullgraph(device):
    W = torch.randn(16, 32, device=device)
    A = torch.randn(4, 32, device=device, requires_grad=True)
    B = torch.randn(16, 4, device=device, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 2.0, 0.1, 11)[0].sum()
    x = torch.randn(3, 32, device=device, requires_grad=True)
    f(x).backward()
    want = torch.autograd.grad(lora_linear_ref(x, W, None, A, B, 2.0, 0.1, 11).sum(), x)[0]
    torch.testing.assert_close(x.grad, want, atol=1e-4, rtol=1e-4)


def test_autocast_casts_activation_and_adapters_not_nf4_state(device):
    q = peftx.nf4_quantize(torch.randn(16, 32, device=device))
    A = torch.randn(4, 32, device=device, requires_grad=True)
    B = torch.randn(16, 4, device=device, requires_grad=True)
    x = torch.randn(3, 32, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y, u = ops.lora_linear_fwd(x, q.packed, q.absmax_fp32(), q.code, 64, None, A, B, 1.0, 0.0, 0)
    assert y.dtype == torch.bfloat16 and u.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), lora_linear_ref(x, q.dequantize(torch.float32), None, A, B, 1.0),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids", [[0, 1, 2, 0, -1, 2, 2], [1, 1, 1, 0, 0, -1, -1], [-1] * 7, [2] * 7])
def test_multi_matches_reference_and_emulated_grid(device, dtype, ids):
    K, N, R, n = 37, 19, 6, 3
    x = torch.randn(7, K, device=device, dtype=dtype)
    base_out = torch.randn(7, N, device=device, dtype=dtype)
    A = (torch.randn(n, R, K, device=device) / K ** 0.5).to(dtype)
    B = torch.randn(n, N, R, device=device).to(dtype)
    B[1, :, 4:] = 0  # adapter 1 has rank 4, zero-padded to 6
    s = torch.tensor([0.5, 2.0, 1.0], device=device)
    idt = torch.tensor(ids, device=device)
    want = lora_multi_ref(x, base_out, A, B, s, idt)
    torch.testing.assert_close(ops.lora_multi_fwd(x, base_out, A, B, s, idt).float(), want, **TOL[dtype])
    emu = torch.ops.peftx_emulate.lora_multi_kernel(x.cpu(), base_out.cpu(), A.cpu(), B.cpu(), s.cpu(), idt.cpu())
    torch.testing.assert_close(emu.float(), want.cpu(), **TOL[dtype])
    # Rows without an adapter are exactly the base output.
    rows = idt == -1
    assert torch.equal(ops.lora_multi_fwd(x, base_out, A, B, s, idt)[rows], base_out[rows])


@pytest.mark.parametrize("isa", ["default", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,R", [(70, 77, 20), (64, 128, 16), (5, 3, 1)])
def test_multi_interleaved_rows_every_cpu_path(monkeypatch, isa, dtype, K, N, R):
    if isa != "default":
        monkeypatch.setenv("PEFTX_CPU_ISA", isa)
    torch.manual_seed(K)
    x = torch.randn(11, K).to(dtype)
    base_out = torch.randn(11, N).to(dtype)
    A = (torch.randn(3, R, K) / K ** 0.5).to(dtype)
    B = torch.randn(3, N, R).to(dtype)
    s = torch.tensor([0.5, 2.0, -1.0])
    ids = torch.tensor([2, 0, 1, 0, -1, 2, 1, 1, 0, 2, 2])
    torch.testing.assert_close(ops.lora_multi_fwd(x, base_out, A, B, s, ids).float(),
                               lora_multi_ref(x, base_out, A, B, s, ids), **TOL[dtype])


@pytest.mark.skipif(not peftx._native._C.cpu_bf16_gemv(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("K,N,R", [(96, 96, 16), (64, 160, 7), (128, 64, 64), (32, 32, 1)])
def test_multi_bf16_row_kernel_rounds_like_the_gemm_path(K, N, R):
    # Interleaved bf16 rows on AVX-512 BF16 run the vdpbf16ps row kernel: u = x A^T rounded to bf16
    # (as the 16-bit GEMMs round it), then y = bf16(base + s * u B^T) with the product in fp32.
    # Rows per adapter leave tails of the 4-row groups; -1 rows are base_out exactly; odd R pads a
    # rank pair; N = 160 takes one 64-wide and one 32-wide output block.
    torch.manual_seed(K + N + R)
    M, n = 23, 3
    x = torch.randn(M, K).bfloat16()
    base_out = torch.randn(M, N).bfloat16()
    A = (torch.randn(n, R, K) / K ** 0.5).bfloat16()
    B = torch.randn(n, N, R).bfloat16()
    s = torch.tensor([0.5, 2.0, -1.0])
    ids = torch.tensor([i % 4 - 1 for i in range(M)])  # -1, 0, 1, 2, -1, ...
    got = ops.lora_multi_fwd(x, base_out, A, B, s, ids)
    want = base_out.clone()
    for a in range(n):
        rows = ids == a
        u = (x[rows].float() @ A[a].float().T).bfloat16().float()
        want[rows] = (base_out[rows].float() + s[a] * (u @ B[a].float().T)).bfloat16()
    keep = ids == -1
    assert torch.equal(got[keep], base_out[keep])
    # u may round differently in its last bit (summation order), moving y by about one bf16 ulp.
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dropout_axpy_matches_reference(dtype):
    t = torch.randn(13, 29).to(dtype)
    dx = torch.randn(13, 29).to(dtype)
    got = torch.ops.peftx_emulate.lora_dropout_axpy_kernel(t, dx, 77, 0.35)
    keep = dropout_keep_ref(77, 13, 29, 0.35)
    scale = torch.tensor(1 / 0.65, dtype=torch.float32)
    want = torch.where(keep, (dx.float() + t.float() * scale).to(dtype), dx)
    assert torch.equal(got, want)


def test_bad_input_names_the_argument():
    x = torch.randn(3, 8)
    W = torch.randn(5, 8)
    A = torch.randn(2, 8)
    B = torch.randn(5, 2)
    f = ops.lora_linear_fwd
    with pytest.raises(RuntimeError, match="lora_A must have shape"):
        f(x, W, None, None, 64, None, torch.randn(2, 9), B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        f(x, W, None, None, 64, None, A, torch.randn(5, 3), 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        f(x, torch.randn(5, 7), None, None, 64, None, A, B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        f(x, W, None, None, 64, None, A, B, 1.0, 1.0, 0)
    with pytest.raises(RuntimeError, match="lora_A and lora_B must be float32"):
        f(x, W, None, None, 64, None, A.to(torch.int32), B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        f(x, W.half(), None, None, 64, None, A, B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="float64 inputs need a dense base|must be float32"):
        q = peftx.nf4_quantize(W)
        f(x.double(), q.packed, q.absmax_fp32(), q.code, 64, None, A.double(), B.double(), 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="adapter_ids must be in"):
        ops.lora_multi_fwd(x, torch.randn(3, 5), torch.randn(2, 2, 8), torch.randn(2, 5, 2), torch.ones(2),
                           torch.tensor([0, 2, -1]))
    with pytest.raises(RuntimeError, match="adapter_ids must have shape"):
        ops.lora_multi_fwd(x, torch.randn(3, 5), torch.randn(2, 2, 8), torch.randn(2, 5, 2), torch.ones(2),
                           torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 61), (5, 64), (9, 129), (2, 1000), (40, 4100)])
@pytest.mark.parametrize("seed", [123456789, 0x7A3C5E91D2B40F17])  # the second with both key words set
def test_cpu_dropout_paths_agree(monkeypatch, shape, dtype, seed):
    # The AVX-512 mask generator (48, 32 or 16 Philox blocks per step, any start offset) and the scalar one make
    # the reference mask bit for bit, in forward (row chunks) and backward (column chunks); the
    # vectorized scaling and the adjoint's update round to the storage type exactly as the scalar
    # loops (NaN and values that round to fp16 subnormals or overflow included).
    M, K = shape
    x = torch.randn(M, K)
    x.view(-1)[:: 7] *= 1e-5  # fp16 subnormals after the scaling
    x.view(-1)[3:: 11] = 7e4  # overflows fp16 once scaled
    x.view(-1)[5:: 13] = float("nan")
    x = x.to(dtype)
    # A zero base weight: the base product of few tokens runs peftx's AVX-512 kernels under the
    # default ISA and the BLAS under the scalar one (equal to rounding, not bit for bit); x W^T and
    # g W are then exactly 0 (NaN rows aside) either way, leaving the dropout paths to compare.
    W = torch.zeros(6, K, dtype=dtype)
    A = torch.randn(3, K, dtype=dtype)
    B = torch.randn(6, 3, dtype=dtype)
    g = torch.randn(M, 6, dtype=dtype)
    results = {}
    rank_kernels = {torch.bfloat16: peftx._native._C.lora_rank_bf16_supported(),  # under the default ISA
                    torch.float32: peftx._native._C.lora_rank_f32_supported()}.get(dtype, False)
    for isa in ("default", "scalar"):
        if isa == "scalar":
            monkeypatch.setenv("PEFTX_CPU_ISA", "scalar")
            assert peftx._native._C.lora_dropout_isa() == "scalar"
        y, u = ops.lora_linear_fwd(x, W, None, None, 64, None, A, B, 1.0, 0.3, seed)
        results[isa] = (y, u) + ops.lora_linear_bwd(g, x, u, W, None, None, 64, A, B, 1.0, 0.3, seed)
    if rank_kernels:
        # bf16 and fp32 run the rank-r kernels by default (sums in another order than the BLAS; their
        # own tests: test_lora_rank_bf16.py, test_lora_rank_f32.py): the mask still shows bit for bit
        # in dx's LoRA term, which is exactly 0 where an element was dropped (the zero base makes g W
        # exactly 0).
        dx_d, dx_s = results["default"][2], results["scalar"][2]
        assert torch.equal(dx_d == 0, dx_s == 0)
        rtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for a, b in zip(results["default"], results["scalar"]):
            tol = rtol * max(1.0, b.float().nan_to_num().abs().max().item())
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=tol, equal_nan=True)
    else:
        for a, b in zip(results["default"], results["scalar"]):
            assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                               b.view(torch.int16 if b.element_size() == 2 else torch.int32))
    if dtype == torch.float32:
        xf = torch.nan_to_num(x, nan=0.0)
        y, u = ops.lora_linear_fwd(xf, W, None, None, 64, None, A, B, 1.0, 0.3, seed)
        want_u = lora_dropout_ref(xf, 0.3, seed) @ A.t()
        torch.testing.assert_close(u, want_u, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_multithreaded_dropout_chunks_with_grad_inputs(kind):
    # Large enough that both the row chunks (forward) and column chunks (backward) spread over
    # threads, with inputs that require grad (the worker threads must not run autograd kernels).
    base, w_ref = _base(kind, 64, 512, torch.float32, "cpu")
    x = torch.randn(300, 512, requires_grad=True)
    A = torch.randn(8, 512, requires_grad=True)
    B = torch.randn(64, 8, requires_grad=True)
    y, _ = _call(x, base, None, A, B, 0.5, 0.2, 77)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, A, B], g)
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    want = torch.autograd.grad(lora_linear_ref(xr, w_ref, None, Ar, Br, 0.5, 0.2, 77), [xr, Ar, Br], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
