"""Products of activations with an NF4Weight, with the argument checks a caller can act on."""

from __future__ import annotations

import torch

from peftx.ops import nf4 as nf4_ops
from peftx.quant.nf4_weight import FLOAT_DTYPES, NF4Weight


def _check(name: str, x: torch.Tensor, w: NF4Weight, features: int, what: str) -> None:
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be an NF4Weight, got {type(w).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{name} must have shape [..., {features}] ({what} of the weight), got {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"{name} is on {x.device} but the weight is on {w.device}")


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.dequantize().T + bias`` for x ``[..., in_features]``; differentiable in x and bias."""
    _check("x", x, w, w.in_features, "in_features")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (w.out_features,):
            raise ValueError(f"bias must be a tensor of shape ({w.out_features},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return nf4_ops.nf4_matmul_raw(x, w.packed, w.absmax_fp32(), w.code, w.blocksize, w.out_features, bias)


def nf4_matmul_t(g: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """``g @ w.dequantize()`` for g ``[..., out_features]``: the input-gradient product."""
    _check("g", g, w, w.out_features, "out_features")
    return nf4_ops.nf4_matmul_t_raw(g, w.packed, w.absmax_fp32(), w.code, w.blocksize, w.in_features)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D float weight to NF4, byte-equal to bitsandbytes' ``quantize_4bit``."""
    return NF4Weight.quantize(weight, blocksize=blocksize, double_quant=double_quant)
