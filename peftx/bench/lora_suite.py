"""The lora suite: a LoRA layer on a 4096 x 4096 base, r = 16, M = 1, 16, 512 tokens, fp32 and bf16,
dropout 0 and 0.05. Forward and forward+backward (x requires grad, the base is frozen) of peftx
LoraLinear vs HF PEFT's LoRA on the same base vs the bare base layer; the QLoRA layer (peftx
LoraLinear4bit) vs HF PEFT over bitsandbytes' Linear4bit vs the dense bf16 layer; the mixed-adapter
forward (8 adapters, rows evenly mixed, M = 512) vs one adapter and vs HF PEFT's adapter_names.
Memory saved for backward is counted with saved-tensor hooks (bytes beyond x and the parameters)."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

import peftx
from peftx.bench.timing import interleaved

log = logging.getLogger(__name__)
IN = OUT = 4096
R = 16
ALPHA = 32


def _hf():
    try:
        from peft import LoraConfig
        from peft.tuners import lora as hf_lora
    except ImportError:
        warnings.warn("peft is not installed: HF PEFT columns are skipped", stacklevel=2)
        return None, None
    return LoraConfig, hf_lora


def _randomize_B(layer, names=("default",)):
    with torch.no_grad():
        for n in names:
            nn.init.normal_(layer.lora_B[n].weight, std=0.02)


def _hf_layer(hf_lora, LoraConfig, base, dropout, ours):
    layer = hf_lora.Linear(base, "default", config=LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout),
                           r=R, lora_alpha=ALPHA, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    return layer


def _fwd_bwd(layer, x, g):
    def step():
        x.grad = None
        layer(x).backward(g)
    return step


def _fwd(layer, x):
    def step():
        with torch.no_grad():
            layer(x)
    return step


def saved_bytes(layer, x) -> int:
    """Bytes saved for backward by one forward, not counting x and the layer's parameters."""
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in layer.parameters()}
    base = getattr(layer, "base_layer", layer)
    w = getattr(base, "weight", None)
    if w is not None and hasattr(w, "packed"):
        skip |= {t.untyped_storage().data_ptr() for t in w.tensors().values()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def run(quick: bool, progress) -> list[dict]:
    LoraConfig, hf_lora = _hf()
    # Every mode takes 15 rounds: the targets here are a few percent, and with 5 the medians of the
    # 512-token rows moved by up to 3% from run to run (a round of those takes about 0.15 s).
    repeats = 15
    rows = []
    torch.manual_seed(0)
    w = torch.randn(OUT, IN) / IN ** 0.5
    for dtype in (torch.float32, torch.bfloat16):
        for dropout in (0.0, 0.05):
            base = nn.Linear(IN, OUT, bias=False).to(dtype)
            with torch.no_grad():
                base.weight.copy_(w)
            base.requires_grad_(False)
            ours = peftx.LoraLinear(base, r=R, lora_alpha=ALPHA, lora_dropout=dropout)
            _randomize_B(ours)
            hf_base = nn.Linear(IN, OUT, bias=False).to(dtype).requires_grad_(False)
            with torch.no_grad():
                hf_base.weight.copy_(w)
            hf = _hf_layer(hf_lora, LoraConfig, hf_base, dropout, ours) if hf_lora else None
            for M in (1, 16, 512):
                x = torch.randn(M, IN, dtype=dtype, requires_grad=True)
                g = torch.randn(M, OUT, dtype=dtype)
                cands = {"base layer": base, "peftx LoraLinear": ours}
                if hf is not None:
                    cands["HF PEFT LoRA"] = hf
                fb = interleaved({k: _fwd_bwd(v, x, g) for k, v in cands.items()}, repeats)
                mem = {k: saved_bytes(v, x) for k, v in cands.items()}
                rows.append(_row("lora fwd+bwd", dtype, M, dropout, fb, "base layer", mem))
                if dropout == 0.0:
                    f = interleaved({k: _fwd(v, x) for k, v in cands.items()}, repeats)
                    rows.append(_row("lora fwd", dtype, M, dropout, f, "base layer"))
                progress()
    return rows + _qlora_rows(w, repeats, LoraConfig, hf_lora, progress) + \
        _multi_rows(repeats, LoraConfig, hf_lora, progress)


def _qlora_rows(w, repeats, LoraConfig, hf_lora, progress) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    dense = nn.Linear(IN, OUT, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(w)
    ours = peftx.LoraLinear4bit.from_linear(nn.Linear(IN, OUT, bias=False), r=R, lora_alpha=ALPHA, lora_dropout=0.05,
                                            compute_dtype=dtype)
    ours.base_layer.weight = peftx.NF4Weight.quantize(w.to(dtype))
    _randomize_B(ours)
    theirs = None
    try:
        import bitsandbytes as bnb
        lin = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=dtype, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=True)
        lin = lin.to("cpu")  # quantizes
        if hf_lora:
            from peft.tuners.lora.bnb import Linear4bit as HFLoraLinear4bit
            theirs = HFLoraLinear4bit(lin, "default", config=LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05),
                                            r=R, lora_alpha=ALPHA, lora_dropout=0.05)
            with torch.no_grad():
                theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
                theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    except ImportError:
        warnings.warn("bitsandbytes is not installed: its QLoRA column is skipped", stacklevel=2)
    for M in (1, 16, 512):
        x = torch.randn(M, IN, dtype=dtype, requires_grad=True)
        g = torch.randn(M, OUT, dtype=dtype)
        cands = {"dense bf16 layer": dense, "peftx LoraLinear4bit": ours}
        if theirs is not None:
            cands["HF PEFT + bnb 4bit"] = theirs
        fb = interleaved({k: _fwd_bwd(v, x, g) for k, v in cands.items()}, repeats)
        mem = {k: saved_bytes(v, x) for k, v in cands.items()}
        row = _row("qlora fwd+bwd", dtype, M, 0.05, fb, "dense bf16 layer", mem)
        if theirs is not None and fb["HF PEFT + bnb 4bit"].faults >= 1000:
            row["notes"] = ["bitsandbytes dequantizes W into a fresh tensor per product (32 MiB: a new mmap under "
                            "glibc's defaults), so its time moves with the cost of a page fault; an allocator that "
                            "recycles the memory (jemalloc, tcmalloc) would save it most of that"]
        rows.append(row)
        progress()
    return rows


def _multi_rows(repeats, LoraConfig, hf_lora, progress) -> list[dict]:
    rows = []
    n_adapters, samples, seq = 8, 64, 8  # M = 512 rows, 8 per sample, adapters cycling over samples
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        base = nn.Linear(IN, OUT, bias=False).to(dtype).requires_grad_(False)
        ours = peftx.LoraLinear(base, r=R, lora_alpha=ALPHA, adapter_name="a0", autocast_adapter_dtype=False)
        names = [f"a{i}" for i in range(n_adapters)]
        for n in names[1:]:
            ours.add_adapter(n, r=R, lora_alpha=ALPHA, autocast_adapter_dtype=False)
        _randomize_B(ours, names)
        ours.eval()
        x = torch.randn(samples, seq, IN, dtype=dtype)
        per_sample = [names[i % n_adapters] for i in range(samples)]
        x2 = x.reshape(-1, IN)
        base_out = base(x2)
        A = torch.stack([ours.lora_A[n].weight for n in names]).detach()
        B = torch.stack([ours.lora_B[n].weight for n in names]).detach()
        s = torch.full((n_adapters,), ALPHA / R)
        ids8 = torch.tensor([i % n_adapters for i in range(samples)]).repeat_interleave(seq)
        ids1 = torch.zeros_like(ids8)
        ops = peftx.ops.lora
        term = {"1 adapter (op)": lambda: ops.lora_multi_fwd(x2, base_out, A[:1], B[:1], s[:1], ids1),
                "8 adapters (op)": lambda: ops.lora_multi_fwd(x2, base_out, A, B, s, ids8)}
        rows.append(_row("multi term", dtype, samples * seq, 0.0, interleaved(term, repeats), "1 adapter (op)"))
        layer = {"peftx adapter_names": _fwd_named(ours, x, per_sample)}
        if hf_lora:
            hf = hf_lora.Linear(base, "a0", config=LoraConfig(r=R, lora_alpha=ALPHA), r=R, lora_alpha=ALPHA)
            for n in names[1:]:
                hf.update_layer(n, r=R, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                                config=LoraConfig(r=R, lora_alpha=ALPHA))
            with torch.no_grad():
                for n in names:
                    hf.lora_A[n].weight.copy_(ours.lora_A[n].weight)
                    hf.lora_B[n].weight.copy_(ours.lora_B[n].weight)
            hf.to(dtype).eval()
            layer["HF PEFT adapter_names"] = _fwd_named(hf, x, per_sample)
        rows.append(_row("multi layer", dtype, samples * seq, 0.0, interleaved(layer, repeats),
                         "HF PEFT adapter_names" if hf_lora else "peftx adapter_names"))
        progress()
    return rows


def _fwd_named(layer, x, names):
    def step():
        with torch.no_grad():
            layer(x, adapter_names=names)
    return step


def _row(op, dtype, M, dropout, timings, anchor, saved=None):
    ref = timings[anchor].median_ms
    row = {"op": op, "dtype": str(dtype).removeprefix("torch."), "M": M, "dropout": dropout,
           "shape": f"{OUT}x{IN} r={R}", "anchor": anchor, "results": {}}
    for name, t in timings.items():
        r = {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "spread": t.spread,
             "x_vs_" + anchor.replace(" ", "_"): t.median_ms / ref, "page_faults": t.faults}
        if saved is not None:
            r["saved_MiB"] = saved[name] / 2**20
        row["results"][name] = r
    return row
