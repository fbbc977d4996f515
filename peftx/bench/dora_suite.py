"""The dora suite (not in the default list): one DoRA layer on a 4096 x 4096 base, r = 16, fp32 and
bf16, M = 16 and 512 tokens, forward+backward (x requires grad; A, B and the magnitude train) of peftx
LoraLinear(use_dora=True) vs HF PEFT's DoRA layer on the same weights, with the plain peftx LoRA layer
as a reference point; and DoRA's weight norm: over an NF4 base, peftx::nf4_lora_row_norm (rows decoded
in registers) vs dequantize + addmm + norm in torch (what HF PEFT does over bitsandbytes); over a
dense bf16 base, peftx::dense_lora_row_norm vs HF PEFT's formula in torch (W in fp32 + addmm + norm)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import peftx
from peftx.bench.lora_suite import _row
from peftx.bench.timing import interleaved
from peftx.ops import dora as dora_ops

IN = OUT = 4096
R = 16
ALPHA = 32
STEPS = 5


def _hf_dora(base, ours):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as HFLinear
    except ImportError:
        warnings.warn("peft is not installed: the HF PEFT DoRA column is skipped", stacklevel=2)
        return None
    layer = HFLinear(base, "default", config=LoraConfig(r=R, lora_alpha=ALPHA, use_dora=True), r=R,
                     lora_alpha=ALPHA, use_dora=True)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector["default"].weight)
    return layer


def _base(w, dtype):
    base = nn.Linear(IN, OUT, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(w)
    return base


def _fwd_bwd(layer, x, g):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)
    return step


def dora_rows(quick: bool = True, progress=lambda: None) -> list[dict]:
    repeats = 5 if quick else 15
    torch.manual_seed(0)
    w = torch.randn(OUT, IN) / IN ** 0.5
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours = peftx.LoraLinear(_base(w, dtype), r=R, lora_alpha=ALPHA, use_dora=True)
        lora = peftx.LoraLinear(_base(w, dtype), r=R, lora_alpha=ALPHA)
        with torch.no_grad():
            for layer in (ours, lora):
                nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        hf = _hf_dora(_base(w, dtype), ours)
        for M in (16, 512):
            x = torch.randn(M, IN, dtype=dtype, requires_grad=True)
            g = torch.randn(M, OUT, dtype=dtype)
            cands = {"peftx LoRA (no DoRA)": lora, "peftx DoRA": ours}
            if hf is not None:
                cands["HF PEFT DoRA"] = hf
            anchor = "HF PEFT DoRA" if hf is not None else "peftx DoRA"
            fb = interleaved({k: _fwd_bwd(v, x, g) for k, v in cands.items()}, repeats)
            rows.append(_row("dora fwd+bwd", dtype, M, 0.0, fb, anchor))
            progress()
    rows.append(_norm_row(w, repeats))
    rows.append(_dense_norm_row(w, repeats))
    progress()
    return rows


def _norm_row(w, repeats) -> dict:
    q = peftx.NF4Weight.quantize(w.to(torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    A = torch.randn(R, IN, generator=g) / IN ** 0.5
    B = torch.randn(OUT, R, generator=g) * 0.02
    absmax = q.absmax_fp32()
    s = ALPHA / R

    def op():
        dora_ops.nf4_lora_row_norm(q.packed, absmax, q.code, q.blocksize, A, B, s)

    def torch_path():
        dense = q.dequantize(torch.float32)
        torch.linalg.vector_norm(torch.addmm(dense, B, A, alpha=s), dim=1)

    got = dora_ops.nf4_lora_row_norm(q.packed, absmax, q.code, q.blocksize, A, B, s)
    want = torch.linalg.vector_norm(torch.addmm(q.dequantize(torch.float32), B, A, alpha=s), dim=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    t = interleaved({"dequantize + norm": torch_path, "nf4_lora_row_norm": op}, repeats)
    row = _row("dora nf4 norm", torch.float32, None, 0.0, t, "dequantize + norm")
    row["notes"] = ["the torch path allocates a 64 MiB fp32 weight; the op decodes 4 rows x 32 columns in registers"]
    return row


def _dense_norm_row(w, repeats) -> dict:
    wb = w.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(R, IN, generator=g) / IN ** 0.5
    B = torch.randn(OUT, R, generator=g) * 0.02
    s = ALPHA / R

    def op():
        dora_ops.dense_lora_row_norm(wb, A, B, s)

    def torch_path():
        torch.linalg.vector_norm(torch.addmm(wb.float(), B, A, alpha=s), dim=1)

    want = torch.linalg.vector_norm(torch.addmm(wb.float(), B, A, alpha=s), dim=1)
    torch.testing.assert_close(dora_ops.dense_lora_row_norm(wb, A, B, s), want, atol=1e-4, rtol=1e-4)
    t = interleaved({"fp32 W + addmm + norm": torch_path, "dense_lora_row_norm": op}, repeats)
    row = _row("dora dense norm", torch.bfloat16, None, 0.0, t, "fp32 W + addmm + norm")
    row["notes"] = ["the torch path allocates two 64 MiB fp32 matrices; the op forms 4 rows x 32 columns in registers"]
    return row


def run(quick: bool, progress) -> list[dict]:
    return dora_rows(quick, progress)
