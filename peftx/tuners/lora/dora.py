"""DoRA (weight-decomposed LoRA, https://arxiv.org/abs/2402.09353) as HF PEFT computes it.

An adapter's weight is ``W' = m * (W + s B A) / ||W + s B A||`` with the norm per output row and a
trained magnitude vector ``m`` [out] (initialised to that norm, so the output starts unchanged). The
norm is detached (treated as a constant in the backward, the paper's section 4.3). The output is

    y = x W^T + b + (f - 1) * xd W^T + f * s * xd A^T B^T,      f = m / ||W + s B A||  [out]

with ``xd`` the dropped-out input; without dropout (or in eval) ``xd = x`` and this is
``f * (x W^T + s x A^T B^T) + b``: one fused ``peftx::lora_linear_fwd`` call (base product without
bias + low-rank term), a row scale and the bias. Merging writes ``f * (W + s B A)`` into the base.

HF PEFT keeps ``m`` as ``lora_magnitude_vector.<adapter>.weight`` (a sub-module per adapter; ``DoraMagnitude``
keeps that layout) and writes it to adapter files as ``...lora_magnitude_vector`` (no adapter name, no
``.weight``: its older layout's key); LoraModel.file_key / key_from_file do the same.
"""

from __future__ import annotations

import torch
from torch import nn

from peftx.ops import dora as dora_ops
from peftx.quant.nf4_weight import NF4Weight


class DoraMagnitude(nn.Module):
    """The magnitude vector ``m`` [out_features] of one DoRA adapter (state-dict key ``weight``)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype: fp32, or fp64 for fp64 tensors."""
    return t if t.dtype == torch.float64 else t.float()


_NORM_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.no_grad()
def dense_row_norm(weight_out_in: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """``||W + s B A||`` per output row [out], fp32 (fp64 for an fp64 W), W [out, in] dense. fp32 / fp16 /
    bf16 tensors on CPU or CUDA take ``peftx::dense_lora_row_norm`` (W + s B A formed in registers,
    never stored); others (fp64 for gradcheck) the torch formula, which materialises it in fp32 / fp64."""
    w = weight_out_in
    if (w.device.type in ("cpu", "cuda") and all(t.dtype in _NORM_OP_DTYPES for t in (w, lora_A, lora_B))
            and lora_A.device == w.device and lora_B.device == w.device):
        return dora_ops.dense_lora_row_norm(w, lora_A, lora_B, scaling)
    w = acc(w)
    v = torch.addmm(w, lora_B.to(w.dtype), lora_A.to(w.dtype), alpha=scaling)
    return torch.linalg.vector_norm(v, dim=1)


@torch.no_grad()
def nf4_row_norm(weight: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||dequant(W) + s B A||`` per output row, fp32 [out], without materialising the dense weight."""
    return dora_ops.nf4_lora_row_norm(weight.packed, weight.absmax_fp32(), weight.code, weight.blocksize,
                                      lora_A, lora_B, scaling)


def scale_rows(z: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``factor * z + bias`` over the last dimension, in fp32 (fp64 for fp64 z), rounded to z's dtype once."""
    y = acc(z) * acc(factor)
    if bias is not None:
        y = y + acc(bias)
    return y.to(z.dtype)
