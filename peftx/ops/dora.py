"""Typed wrappers and fakes of ``peftx::nf4_lora_row_norm`` and ``peftx::dense_lora_row_norm``, DoRA's
weight norm over an NF4 and over a dense base.

Schema: csrc/registration.cpp. Kernels: csrc/dora/. References: ``reference.nf4_lora_row_norm_ref``,
``reference.dense_lora_row_norm_ref``.

    norm[o] = || W[o, :] + scale * (B A)[o, :] ||_2     fp32 [out_features]

for W [out, in] NF4 (packed bytes, fp32 absmax, 16-entry code; dequant(W) above) or dense (fp32, fp16,
bf16), A [r, in], B [out, r]. Each row is read (decoded) and combined with the rank-r term in
registers (CUDA: one warp per row; CPU on AVX-512: 4 rows x 32 columns a tile, otherwise row blocks
through BLAS (dense) or one row buffer per thread (NF4)): W + scale B A is never materialised. The ops have no
autograd formula: DoRA treats the norm as a constant (the paper's section 4.3, as HF PEFT), so the
wrappers detach A and B.
"""

from __future__ import annotations

import torch

from peftx._native import _C  # noqa: F401  (registers the ops)

ops = torch.ops.peftx


def nf4_lora_row_norm(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                      lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    return ops.nf4_lora_row_norm(packed, absmax, code, int(blocksize), lora_A.detach(), lora_B.detach(),
                                 float(scale))


@torch.library.register_fake("peftx::nf4_lora_row_norm")
def _(packed, absmax, code, blocksize, lora_A, lora_B, scale):
    torch._check(lora_A.dim() == 2, lambda: f"nf4_lora_row_norm: lora_A must be 2-D [r, in_features], got "
                                            f"{tuple(lora_A.shape)}")
    torch._check(lora_B.dim() == 2 and lora_B.shape[1] == lora_A.shape[0],
                 lambda: f"nf4_lora_row_norm: lora_B must have shape [out_features, r], got {tuple(lora_B.shape)}")
    torch._check(packed.numel() * 2 >= lora_B.shape[0] * lora_A.shape[1],
                 lambda: "nf4_lora_row_norm: packed holds fewer elements than [out_features, in_features]")
    return packed.new_empty((lora_B.shape[0],), dtype=torch.float32)


def dense_lora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: float) -> torch.Tensor:
    return ops.dense_lora_row_norm(weight.detach(), lora_A.detach(), lora_B.detach(), float(scale))


@torch.library.register_fake("peftx::dense_lora_row_norm")
def _(weight, lora_A, lora_B, scale):
    torch._check(weight.dim() == 2, lambda: f"dense_lora_row_norm: weight must be 2-D [out_features, in_features], "
                                            f"got {tuple(weight.shape)}")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == weight.shape[1],
                 lambda: f"dense_lora_row_norm: lora_A must have shape [r, {weight.shape[1]}], got {tuple(lora_A.shape)}")
    torch._check(lora_B.dim() == 2 and lora_B.shape[0] == weight.shape[0] and lora_B.shape[1] == lora_A.shape[0],
                 lambda: f"dense_lora_row_norm: lora_B must have shape [{weight.shape[0]}, {lora_A.shape[0]}], got "
                         f"{tuple(lora_B.shape)}")
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)
