"""The nf4 suite: quantize, dequantize, nf4_matmul and its transposed product (the input gradient) on
a 4096 x 4096 weight, against dense torch and bitsandbytes (matmul_4bit, and its eval-mode
Linear4bit), all in the same process with interleaved runs.

What the targets need: bf16 at M = 1 with the weights out of cache (every candidate rotates over
16 distinct weights, 134 MiB of NF4 and far more dense, so none sits in the 32 MiB L3), with and
without autograd recording; M = 16; M = 512; fp32 activations; and, at M = 1, the achieved read
bandwidth (bytes of the NF4 weight: packed codes + double-quantized absmax) against the machine's
measured DRAM read bandwidth."""

from __future__ import annotations

import itertools
import logging
import warnings

import torch

import peftx
from peftx._native import _C
from peftx.bench.timing import interleaved

log = logging.getLogger(__name__)
N = K = 4096
ROTATE = 16
STEPS = 12  # progress steps of run()


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        warnings.warn("bitsandbytes is not installed: its columns are skipped", stacklevel=2)
        return None, None
    return bnb, F


def _cycle(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def _weight_bytes(q) -> int:
    return sum(t.numel() * t.element_size() for k, t in q.tensors().items() if k not in ("code", "nested_code"))


def run(quick: bool, progress) -> list[dict]:
    bnb, F = _bnb()
    rows = []
    repeats = 7 if quick else 21
    torch.manual_seed(0)
    w32 = torch.randn(N, K)
    log.info("nf4 suite: peftx CPU kernels %s (bf16 dot-product GEMV: %s)", _C.cpu_isa(), _C.cpu_bf16_gemv())

    # quantize / dequantize
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        w = w32.to(dtype)
        q = peftx.nf4_quantize(w)
        fns = {"peftx": lambda: peftx.nf4_quantize(w)}
        if bnb:
            fns["bitsandbytes"] = lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        rows.append(_row("quantize", dtype, None, interleaved(fns, repeats), "bitsandbytes"))
        progress()
        fns = {"peftx": lambda: q.dequantize()}
        if bnb:
            p, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            fns["bitsandbytes"] = lambda: F.dequantize_4bit(p, st)
        rows.append(_row("dequantize", dtype, None, interleaved(fns, repeats), "bitsandbytes"))
        progress()

    # products
    weights = [torch.randn(N, K) for _ in range(ROTATE)]
    for dtype in (torch.bfloat16, torch.float32):
        dense = [w.to(dtype) for w in weights]
        ours = [peftx.nf4_quantize(w) for w in dense]
        # Two sets of bitsandbytes layers: the eval path repacks a layer's weight for its CPU inference
        # kernel on first use, and matmul_4bit on a repacked weight takes that kernel too, so
        # matmul_4bit gets weights no eval forward has touched (its dequantize + linear path).
        theirs, theirs_fn = [], []
        if bnb:
            for w in dense:
                for group in (theirs, theirs_fn):
                    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4")
                    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
                    group.append(lin.to("cpu").eval())
        for M in (1, 16, 512):
            x = torch.randn(M, K).to(dtype)
            xg = x.clone().requires_grad_(True)
            k = ROTATE if M == 1 else 1
            d, o = _cycle(dense[:k]), _cycle(ours[:k])
            t, tf = (_cycle(theirs[:k]), _cycle(theirs_fn[:k])) if theirs else (None, None)
            fns = {"dense torch": lambda: x @ d().T, "peftx": lambda: peftx.nf4_matmul(x, o()),
                   "peftx (autograd)": lambda: _with_grad(lambda: peftx.nf4_matmul(xg, o()))}
            if theirs:
                fns["bnb matmul_4bit"] = lambda: (lambda m: bnb.matmul_4bit(
                    x, m.weight.t(), quant_state=m.weight.quant_state))(tf())
                with torch.no_grad():
                    for m in theirs[:k]:
                        m(x)  # the eval path repacks on first use: not timed
                fns["bnb Linear4bit eval"] = lambda: _no_grad(t(), x)
            with torch.no_grad():
                rows.append(_row("nf4_matmul", dtype, M, interleaved(fns, repeats), "dense torch",
                                 bytes_read=_weight_bytes(ours[0]) if M == 1 else None))
            if theirs and dtype != torch.bfloat16:
                rows[-1]["notes"] = ["bitsandbytes' CPU eval kernel computes in bf16 whatever the input dtype (x and "
                                     "the weight rounded to bf16); peftx and bnb matmul_4bit multiply in fp32"]
            progress()
        # the input-gradient product g @ W (what backward runs), bf16 only
        if dtype == torch.bfloat16:
            for M in (1, 512):
                g = torch.randn(M, N).to(dtype)
                k = ROTATE if M == 1 else 1
                d, o = _cycle(dense[:k]), _cycle(ours[:k])
                fns = {"dense torch": lambda: g @ d(), "peftx": lambda: peftx.nf4_matmul_t(g, o())}
                with torch.no_grad():
                    rows.append(_row("nf4_matmul_t", dtype, M, interleaved(fns, repeats), "dense torch",
                                     bytes_read=_weight_bytes(ours[0]) if M == 1 else None))
                progress()
    return rows


def _no_grad(m, x):
    with torch.no_grad():
        return m(x)


def _with_grad(fn):
    with torch.enable_grad():
        return fn()


def _row(op, dtype, M, timings, anchor, bytes_read=None):
    base = timings.get(anchor) or timings["peftx"]
    row = {"op": op, "dtype": str(dtype).removeprefix("torch."), "M": M, "shape": f"{N}x{K}", "results": {}}
    for name, t in timings.items():
        r = {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "spread": t.spread,
             "x_vs_" + anchor.replace(" ", "_"): t.median_ms / base.median_ms}
        if bytes_read and name.startswith("peftx"):
            r["GBps"] = bytes_read / (t.median_ms * 1e-3) / 1e9
        row["results"][name] = r
    row["anchor"] = anchor
    return row
