"""Pure-torch twins of the fused optimizer ops (peftx/ops/optim.py): the definitions the kernels are
tested against. Every elementwise operation is a separate torch op (separately rounded, no FMA), in
the kernels' order (csrc/optim/adamw_math.h), so the kernels match them bit for bit.

The 8-bit format is bitsandbytes' 8-bit Adam state: blocks of 256 elements, codes of the signed
dynamic map for the first moment and of the unsigned map for the second, quantized as bitsandbytes'
pure-torch ``quantize_blockwise`` does (nearest code = bucketize over the fp32 code midpoints), except
that a positive second moment never takes code 0 (csrc/optim/adamw_math.h says why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from peftx._native import _C
from peftx.ops.reference import DYNAMIC_CODE

UNSIGNED_DYNAMIC_CODE = torch.tensor(_C.unsigned_dynamic_code(), dtype=torch.float32)
QUANT_BLOCK = 256


def bias_terms(lr: float, beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """(-lr / (1 - beta1^t), sqrt(1 - beta2^t)) in double, as the kernels' host code forms them."""
    return -(lr / (1.0 - beta1 ** step)), math.sqrt(1.0 - beta2 ** step)


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def adamw_math_ref(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: float, *, lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float,
                   maximize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 p, g, m, v -> new (p, m, v)."""
    neg_step, bc2 = bias_terms(lr, beta1, beta2, step)
    g = g * _f32(-1.0 if maximize else 1.0)
    p = p * _f32(1.0 - lr * weight_decay)
    m = m + _f32(1.0 - beta1) * (g - m)
    v = v * _f32(beta2) + (_f32(1.0 - beta2) * g) * g
    # torch.sqrt on CPU may go through MKL's vector math (not correctly rounded); the square root of a
    # float32 taken in float64 and rounded once is the correctly rounded float32 square root.
    denom = torch.sqrt(v.double()).float() / _f32(bc2) + _f32(eps)
    return p + (_f32(neg_step) * m) / denom, m, v


def _increment(steps: Sequence[torch.Tensor]) -> None:
    for s in {id(s): s for s in steps}.values():
        s.add_(1)


def adamw_step_ref(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                   exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float, maximize: bool = False,
                   increment_steps: bool = False) -> None:
    """In place, like the op."""
    if increment_steps:
        _increment(steps)
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        np_, nm, nv = adamw_math_ref(p.float(), g.float(), m, v, float(s), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                     weight_decay=weight_decay, maximize=maximize)
        p.copy_(np_)
        m.copy_(nm)
        v.copy_(nv)


def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int = QUANT_BLOCK,
                           positive_floor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' pure-torch quantize_blockwise over the flattened tensor -> (uint8 codes, fp32
    absmax); a block whose absmax is not finite stores absmax NaN and codes 0 (the kernels' rule).
    ``positive_floor``: a positive value never takes code 0 (the second moment's rule)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1) if full else flat.new_empty(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n > full:
        tail = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    mid = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, mid.to(scaled.device)).to(torch.uint8)
    if positive_floor:
        q = torch.where((q == 0) & (scaled > 0), torch.ones_like(q), q)
    bad = ~torch.isfinite(absmax)
    if bad.any():
        absmax = torch.where(bad, torch.full_like(absmax, float("nan")), absmax)
        q = torch.where(bad.repeat_interleave(blocksize)[:n], torch.zeros_like(q), q)
    return q.reshape(x.shape), absmax


def dequantize_blockwise_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                             blocksize: int = QUANT_BLOCK) -> torch.Tensor:
    """code[q] * absmax[block] in fp32, over the flattened tensor."""
    flat = code.to(q.device)[q.reshape(-1).long()]
    return (flat * absmax.repeat_interleave(blocksize)[:flat.numel()]).reshape(q.shape)


def adamw8bit_step_ref(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, steps, *,
                       lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       maximize: bool = False, increment_steps: bool = False) -> None:
    """In place, like the op."""
    if increment_steps:
        _increment(steps)
    for p, g, qm, am, qv, av, s in zip(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                       exp_avg_sq_absmax, steps):
        m = dequantize_blockwise_ref(qm, am, DYNAMIC_CODE)
        v = dequantize_blockwise_ref(qv, av, UNSIGNED_DYNAMIC_CODE)
        np_, nm, nv = adamw_math_ref(p.float(), g.float(), m.reshape(p.shape), v.reshape(p.shape), float(s), lr=lr,
                                     beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
        p.copy_(np_)
        for codes, absmax, value, code, floor in ((qm, am, nm, DYNAMIC_CODE, False),
                                                  (qv, av, nv, UNSIGNED_DYNAMIC_CODE, True)):
            nq, na = quantize_blockwise_ref(value, code, positive_floor=floor)
            codes.copy_(nq.reshape(codes.shape))
            absmax.copy_(na)
