"""Typed wrappers and fakes of the fused optimizer-step ops (schemas: csrc/registration.cpp; kernels:
csrc/optim/). Both ops update their tensor-list arguments in place and return nothing, so they have
no autograd: optimizers call them under ``torch.no_grad()``.

``steps[i]`` is the step count of this update for ``params[i]``, a one-element tensor (the optimizers
keep CPU float32 scalars, as torch.optim does): with ``increment_steps`` the op adds 1 to each distinct
step tensor first, else the caller has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftx._native import _C  # noqa: F401  (registers the ops)

ops = torch.ops.peftx

QUANT_BLOCK = 256  # elements per absmax of the 8-bit state


def adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, maximize: bool = False,
               increment_steps: bool = False) -> None:
    """One AdamW step for many tensors in one call (fp32 state; params fp32, fp16 or bf16)."""
    if len(params) == 0 and len(grads) == 0:
        return  # nothing to dispatch on
    ops.adamw_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps), float(lr),
                   float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize), bool(increment_steps))


def adamw8bit_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   exp_avg_codes: Sequence[torch.Tensor], exp_avg_absmax: Sequence[torch.Tensor],
                   exp_avg_sq_codes: Sequence[torch.Tensor], exp_avg_sq_absmax: Sequence[torch.Tensor],
                   steps: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float, maximize: bool = False, increment_steps: bool = False) -> None:
    """One AdamW step with blockwise 8-bit state (bitsandbytes' 8-bit Adam format, blocks of 256)."""
    if len(params) == 0 and len(grads) == 0:
        return
    ops.adamw8bit_step(list(params), list(grads), list(exp_avg_codes), list(exp_avg_absmax),
                       list(exp_avg_sq_codes), list(exp_avg_sq_absmax), list(steps), float(lr), float(beta1),
                       float(beta2), float(eps), float(weight_decay), bool(maximize), bool(increment_steps))


def quant_blocks(numel: int) -> int:
    return (numel + QUANT_BLOCK - 1) // QUANT_BLOCK


# --- fakes: shape checks only (the ops return nothing) -----------------------------------------

def _check_lists(op, params, **lists):
    for name, lst in lists.items():
        torch._check(len(lst) == len(params),
                     lambda name=name, lst=lst: f"{op}: {name} must have one tensor per parameter "
                                                f"({len(params)}), got {len(lst)}")


@torch.library.register_fake("peftx::adamw_step")
def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize,
      increment_steps=False):
    _check_lists("adamw_step", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        torch._check(m.numel() == p.numel() and v.numel() == p.numel(),
                     lambda i=i: f"adamw_step: the state of params[{i}] must have its number of elements")


@torch.library.register_fake("peftx::adamw8bit_step")
def _(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, steps, lr, beta1, beta2,
      eps, weight_decay, maximize, increment_steps=False):
    _check_lists("adamw8bit_step", params, grads=grads, exp_avg_codes=exp_avg_codes, exp_avg_absmax=exp_avg_absmax,
                 exp_avg_sq_codes=exp_avg_sq_codes, exp_avg_sq_absmax=exp_avg_sq_absmax, steps=steps)
    for i, (p, q, a) in enumerate(zip(params, exp_avg_codes, exp_avg_absmax)):
        torch._check(q.numel() == p.numel() and a.numel() == quant_blocks(p.numel()),
                     lambda i=i: f"adamw8bit_step: the 8-bit state of params[{i}] does not match its size")
