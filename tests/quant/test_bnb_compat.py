"""Byte equality with bitsandbytes 0.50.2's NF4 (quantize_4bit, compress_statistics) and its
Linear4bit state dicts."""

import io

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

import peftx  # noqa: E402
from peftx.ops.reference import DYNAMIC_CODE, NF4_CODE, NF4_MIDPOINTS  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bnb_dequantize(packed, st):
    """bitsandbytes' definition of NF4 decoding: its pure-torch default backend. (Its native CPU
    kernel in 0.50.2, which F.dequantize_4bit dispatches to, decodes wrongly when blocks straddle
    rows, i.e. in_features % blocksize != 0; test_bnb_native_cpu_dequant_straddling shows it.)"""
    from bitsandbytes.backends.default import ops as default_ops
    fn = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    return fn(packed.reshape(-1).view(torch.uint8), absmax, st.code.cpu(), st.blocksize, tuple(st.shape), st.dtype)


def test_tables_match_bitsandbytes():
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(DYNAMIC_CODE, F.create_dynamic_map().float())
    assert torch.equal(NF4_MIDPOINTS, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2)


def _fuzz_weight(gen, shape, dtype, kind):
    if kind == "normal":
        w = torch.randn(shape, generator=gen)
    elif kind == "scaled":  # block maxima spread over decades exercise the double quantization
        w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen).clamp(-3, 3) * 2.5)
    elif kind == "midpoints":  # values on the NF4 decision boundaries, where rounding matters
        idx = torch.randint(0, 15, shape, generator=gen)
        w = NF4_MIDPOINTS[idx] * torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, -1.0)
        w.view(-1)[::64] = 1.0
    elif kind == "sparse":
        w = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.05)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("kind", ["normal", "scaled", "midpoints", "sparse"])
def test_quantize_byte_equal_fuzzed(dtype, blocksize, kind):
    gen = torch.Generator().manual_seed(hash((str(dtype), blocksize, kind)) % 2**31)
    for _ in range(3):
        shape = (int(torch.randint(1, 300, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen)))
        w = _fuzz_weight(gen, shape, dtype, kind)
        for dq in (True, False):
            ours = peftx.nf4_quantize(w, blocksize=blocksize, double_quant=dq)
            packed, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
            assert torch.equal(ours.packed, packed), (shape, dq)
            assert torch.equal(ours.absmax, st.absmax), (shape, dq)
            if dq:
                assert torch.equal(ours.nested_absmax, st.state2.absmax)
                assert torch.equal(ours.offset, st.offset)
                assert torch.equal(ours.nested_code, st.state2.code)
            assert torch.equal(ours.dequantize(), bnb_dequantize(packed, st))


def test_quantize_straddling_and_tail_blocks():
    w = torch.randn(7, 100)  # 700 elements: blocks straddle rows, tail block of 60, odd rows
    ours = peftx.nf4_quantize(w, blocksize=64)
    packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert ours.packed.shape == packed.shape == (350, 1)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, st.absmax)
    w = torch.randn(3, 5)  # odd element count: the pad nibble
    assert torch.equal(peftx.nf4_quantize(w).packed, F.quantize_4bit(w, quant_type="nf4")[0])


def test_zero_blocks_match():
    w = torch.zeros(4, 128)
    w[1, 5] = 3.0
    ours = peftx.nf4_quantize(w)
    packed, st = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, st.absmax)
    assert torch.equal(ours.dequantize(), bnb_dequantize(packed, st))


def test_bnb_native_cpu_dequant_straddling():
    """Where bitsandbytes' native CPU dequantize agrees with its own definition we match it bit for
    bit; for straddling blocks it disagrees with its definition (a bitsandbytes 0.50.2 bug) while we
    match the definition."""
    w = torch.randn(256, 256)
    ours = peftx.nf4_quantize(w)
    packed, st = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.dequantize(), F.dequantize_4bit(packed, st))
    w = torch.randn(280, 240)
    ours = peftx.nf4_quantize(w)
    packed, st = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.dequantize(), bnb_dequantize(packed, st))


def test_bits_per_parameter():
    q = peftx.nf4_quantize(torch.randn(4096, 4096))
    assert round(q.bits_per_parameter(), 3) == 4.127
    assert round(peftx.nf4_quantize(torch.randn(4096, 4096), double_quant=False).bits_per_parameter(), 3) == 4.5


def _bnb_linear(w, bias, quant_type="nf4", dq=True, storage=torch.uint8):
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                            quant_type=quant_type, compress_statistics=dq, quant_storage=storage)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=dq,
                                   quant_storage=storage)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias)
    return lin.to("cpu")


def test_state_dict_keys_and_bytes_equal_bnb():
    w, b = torch.randn(48, 80), torch.randn(48)
    ours = peftx.Linear4bit.from_linear(_linear(w, b)).state_dict()
    theirs = _bnb_linear(w, b).state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        if k.endswith("bitsandbytes__nf4"):
            import json
            assert json.loads(bytes(ours[k].tolist())) == json.loads(bytes(theirs[k].tolist()))
        else:
            assert torch.equal(ours[k], theirs[k]), k


def _linear(w, b=None):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


@pytest.mark.parametrize("quant_type,dq,storage", [("nf4", True, torch.uint8), ("nf4", False, torch.uint8),
                                                   ("fp4", True, torch.uint8), ("fp4", False, torch.uint8),
                                                   ("nf4", True, torch.bfloat16), ("nf4", True, torch.float32)])
def test_load_bnb_checkpoints(quant_type, dq, storage):
    w, b = torch.randn(32, 64), torch.randn(32)
    theirs = _bnb_linear(w, b, quant_type, dq, storage)
    sd = theirs.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf)
    mine = peftx.Linear4bit.from_linear(_linear(torch.zeros(32, 64), torch.zeros(32)))
    mine.load_state_dict(sd)
    x = torch.randn(5, 64)
    ref = x @ F.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).float().T + b
    torch.testing.assert_close(mine(x), ref, atol=1e-4, rtol=1e-4)
    # saving restores the exact bytes (and storage dtype) that were loaded
    again = mine.state_dict()
    for k, v in theirs.state_dict().items():
        if "quant_state" not in k:
            assert again[k].dtype == v.dtype, k
            assert torch.equal(again[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_bnb_loads_our_state_dict():
    w, b = torch.randn(24, 96), torch.randn(24)
    mine = peftx.Linear4bit.from_linear(_linear(w, b))
    sd = mine.state_dict()
    # The way transformers loads a pre-quantized bitsandbytes checkpoint.
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(bnb_dequantize(param.data, param.quant_state), mine.weight.dequantize())
    x = torch.randn(3, 96)
    torch.testing.assert_close(mine(x), x @ mine.weight.dequantize().T + b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd.pop("weight.absmax"), "absmax"),
    (lambda sd: sd.pop("weight.nested_absmax"), "double quantization is partial"),
    (lambda sd: sd.__setitem__("weight", sd["weight"][:10]), "bytes"),
    (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"][:3]), "absmax must hold"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", torch.tensor([1, 2, 3], dtype=torch.uint8)),
     "JSON"),
    (lambda sd: sd.__setitem__("weight.quant_map", torch.zeros(8)), "quant_map"),
])
def test_corrupt_state_dict_errors(mutate, match):
    sd = peftx.Linear4bit.from_linear(_linear(torch.randn(16, 64))).state_dict()
    mutate(sd)
    with pytest.raises((ValueError, RuntimeError), match=match):
        peftx.NF4Weight.from_bnb_state_dict(sd) if "weight" in sd else None
        peftx.Linear4bit.from_linear(_linear(torch.randn(16, 64))).load_state_dict(sd)
