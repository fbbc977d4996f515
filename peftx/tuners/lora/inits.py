"""Data-driven initialisations of a LoRA adapter (``LoraConfig.init_lora_weights``), as HF PEFT
defines them. Each takes the base weight W [out, in] in fp32 and the adapter's rank r and scaling s
and returns ``(A [r, in], B [out, r], residual)`` with ``residual + s B A = W`` (up to rounding; LoftQ:
``residual`` is the quantized weight and the sum approximates W):

- ``pissa``: the r principal singular triplets, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``;
  ``pissa_niter_<k>``: the same from ``torch.svd_lowrank`` with k subspace iterations (fast SVD).
- ``olora``: ``W = Q R`` (reduced QR), ``B = Q[:, :r]``, ``A = R[:r]``; the residual is ``W - s B A``
  (HF PEFT's exact formula: the adapter keeps no scaling correction).
- ``loftq``: alternates NF4 quantization of ``W - s B A`` and a rank-r SVD of ``W - dequant(Q)``
  (https://arxiv.org/abs/2310.08659), so ``dequant(Q) + s B A`` is closer to W than ``dequant(Q)`` alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from peftx.quant.nf4_weight import NF4Weight

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclass
class LoftQConfig:
    """HF PEFT's LoftQ sub-config (stored in ``LoraConfig.loftq_config`` as a dict)."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits: 4 (NF4, the only one peftx has)."})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating quantization / SVD iterations (>= 1)."})


def is_known_init(init) -> bool:
    return init in (True, False, "gaussian", "pissa", "olora", "loftq") or \
        (isinstance(init, str) and _PISSA_NITER.fullmatch(init) is not None)


def modifies_base(init) -> bool:
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "loftq"))


@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scaling: float, init: str):
    w = weight.float()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r], Vh[:r]
    else:
        niter = int(_PISSA_NITER.fullmatch(init).group(1))
        Ur, Sr, V = torch.svd_lowrank(w, q=r, niter=niter)
        Vhr = V.t()
    root = torch.sqrt(Sr / scaling)
    A = root[:, None] * Vhr
    B = Ur * root[None, :]
    return A, B, w - scaling * (B @ A)


@torch.no_grad()
def olora(weight: torch.Tensor, r: int, scaling: float):
    w = weight.float()
    Q, R = torch.linalg.qr(w)
    B, A = Q[:, :r].contiguous(), R[:r].contiguous()
    return A, B, w - scaling * (B @ A)


def check_loftq_config(loftq_config: dict | LoftQConfig | None) -> tuple[int, int]:
    if isinstance(loftq_config, LoftQConfig):
        loftq_config = vars(loftq_config)
    if not loftq_config:
        raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. LoraConfig(init_lora_weights='loftq', "
                         "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))")
    bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    if bits != 4:
        raise ValueError(f"loftq_config: loftq_bits={bits!r} is not supported; peftx's LoftQ quantizes to NF4 "
                         "(loftq_bits=4)")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq_config: loftq_iter must be an integer >= 1, got {iters!r}")
    return bits, iters


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, scaling: float, iters: int, blocksize: int = 64,
          double_quant: bool = True) -> tuple[torch.Tensor, torch.Tensor, NF4Weight]:
    """``(A, B, Q)``: Q the NF4 weight (peftx's bitsandbytes-compatible quantizer, ``blocksize`` /
    ``double_quant`` as the layer that will hold it) and ``s B A`` the rank-r SVD of ``W - dequant(Q)``.
    Unlike HF PEFT (whose factors assume scaling 1), the factors are divided by sqrt(s) so that the
    adapter's actual contribution ``s B A`` is the SVD term for any lora_alpha / r."""
    w = weight.detach().float()
    target = w
    root = math.sqrt(scaling)
    for i in range(iters):
        q = NF4Weight.quantize(target.to(weight.dtype), blocksize=blocksize, double_quant=double_quant)
        U, S, Vh = torch.linalg.svd(w - q.dequantize(torch.float32), full_matrices=False)
        sr = torch.sqrt(S[:r])
        B, A = U[:, :r] * (sr / root), (sr / root)[:, None] * Vh[:r]
        if i + 1 < iters:
            target = w - scaling * (B @ A)
    return A, B, q
