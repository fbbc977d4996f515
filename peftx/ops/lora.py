"""Typed wrappers and fakes of the peftx LoRA ops, and the autograd of the double-quantized QLoRA path.

Schemas: csrc/registration.cpp. Kernels: csrc/lora/. Autocast: csrc/lora/lora_autocast.cpp. The autograd
of lora_linear_fwd (the derivation below): csrc/lora/lora_autograd.cpp.

Forward, for x [M, K] (leading dimensions flattened), W [N, K] frozen, A [r, K], B [N, r], scaling s
and the dropout D (mask m regenerated from the seed, D(x) = x * m / (1 - p)):

    u = D(x) A^T                      [M, r]   (saved, with x; never D(x) itself)
    y = x W^T + b + s u B^T           [M, N]   (the LoRA term is added into the base result)

Backward, for g = dL/dy [M, N]:

    gB = s g B                        [M, r]   (computed once, used by all three below)
    dB = s g^T u                      [N, r]   (= dL/du^T-free form: y depends on B through s u B^T)
    dA = gB^T D(x)                    [r, K]   (dL/du = s g B = gB, u = D(x) A^T)
    dx = g W + D^T(gB A)              [M, K]   (D is linear and self-adjoint: the same mask and scale)
    db = sum_M g;  dW = g^T x only if the base weight asks for a gradient.
"""

from __future__ import annotations

import torch

from peftx._native import _C  # noqa: F401  (registers the ops)

ops = torch.ops.peftx

_SEED_BOUND = 2**62


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator: torch.manual_seed reproduces it and
    gradient checkpointing (which restores the RNG state) redraws the same one."""
    return int(torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64).item())


def lora_linear_fwd(x, weight, absmax, code, blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, u)``: see the module docstring. ``weight`` is dense [N, K] (absmax, code None) or the
    packed NF4 bytes (absmax fp32 and code [16] given)."""
    return ops.lora_linear_fwd(x, weight, absmax, code, blocksize, bias, lora_A, lora_B, float(scaling),
                               float(dropout_p), seed)


def lora_linear_bwd(grad, x, u, weight, absmax, code, blocksize, lora_A, lora_B, scaling, dropout_p, seed,
                    need_dx=True):
    return ops.lora_linear_bwd(grad, x, u, weight, absmax, code, blocksize, lora_A, lora_B, float(scaling),
                               float(dropout_p), seed, bool(need_dx))


def lora_multi_fwd(x, base_out, lora_A, lora_B, scalings, adapter_ids):
    """``base_out`` plus each row's adapter term; ``adapter_ids`` int64 per row, -1 for the base only."""
    return ops.lora_multi_fwd(x, base_out, lora_A, lora_B, scalings, adapter_ids)


# --- fakes ------------------------------------------------------------------------------------

def _fwd_fake(op, x, lora_A, lora_B):
    """(y, u) of the LoRA forwards' shapes, with their checks of x, lora_A and lora_B."""
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == x.shape[-1],
                 lambda: f"{op}: lora_A must have shape [r, {x.shape[-1]}], got {tuple(lora_A.shape)}")
    torch._check(lora_B.dim() == 2 and lora_B.shape[1] == lora_A.shape[0],
                 lambda: f"{op}: lora_B must have shape [out_features, r], got {tuple(lora_B.shape)}")
    tokens = torch.Size(x.shape[:-1]).numel()
    return (x.new_empty((*x.shape[:-1], lora_B.shape[0])), x.new_empty((tokens, lora_A.shape[0])))


@torch.library.register_fake("peftx::lora_linear_fwd")
def _(x, weight, absmax, code, blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _fwd_fake("lora_linear_fwd", x, lora_A, lora_B)


@torch.library.register_fake("peftx::lora_linear_bwd")
def _(grad, x, u, weight, absmax, code, blocksize, lora_A, lora_B, scaling, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.register_fake("peftx::lora_multi_fwd")
def _(x, base_out, lora_A, lora_B, scalings, adapter_ids):
    return torch.empty_like(base_out, memory_format=torch.contiguous_format)


# --- autograd ---------------------------------------------------------------------------------
# lora_linear_fwd's autograd is registered in C++ (csrc/lora/lora_autograd.cpp, with the derivation):
# saved are x, u and the tensors the caller already holds; lora_linear_bwd gives dx, dA and dB.


# --- a 4-bit base with double-quantized absmax -------------------------------------------------
# lora_linear_nf4dq_fwd (csrc/lora/lora_nf4dq.cpp, autograd in C++): the fp32 absmax is decoded per
# call (on the CPU into a per-thread buffer per size) and never saved for backward.

@torch.library.register_fake("peftx::lora_linear_nf4dq_fwd")
def _(x, packed, qabsmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, bias, lora_A,
      lora_B, scaling, dropout_p, seed):
    return _fwd_fake("lora_linear_nf4dq_fwd", x, lora_A, lora_B)


def lora_linear_nf4(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``lora_linear_fwd``'s y over an ``NF4Weight`` (x already in the compute dtype, autocast
    included). With double quantization, saved for backward are x, u and the weight's own tensors
    only (lora_linear_nf4dq_fwd); otherwise the op is called directly (its fp32 absmax is the weight's)."""
    if not weight.double_quant:
        return lora_linear_fwd(x, weight.packed, weight.absmax, weight.code, weight.blocksize, bias, lora_A, lora_B,
                               scaling, dropout_p, seed)[0]
    return ops.lora_linear_nf4dq_fwd(x, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code,
                                     weight.offset, weight.code, weight.blocksize, weight.nested_blocksize, bias,
                                     lora_A, lora_B, float(scaling), float(dropout_p), seed)[0]
