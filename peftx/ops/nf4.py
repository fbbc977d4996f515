"""Typed wrappers, fakes (for torch.compile / meta tensors) and autograd of the peftx NF4 ops.

Schemas: csrc/registration.cpp. Kernels: csrc/nf4/. Autocast (CPU and CUDA) is registered in C++
(csrc/nf4/nf4_autocast.cpp): the activation and bias are cast to the autocast dtype, the 4-bit
state never is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftx._native import _C  # noqa: F401  (registers the ops)

ops = torch.ops.peftx


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 of ``weight`` (flattened) -> (packed uint8 [ceil(n/2), 1], absmax fp32)."""
    return ops.nf4_quantize(weight, blocksize)


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                   shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return ops.nf4_dequantize(packed, absmax, code, blocksize, list(shape), dtype)


def nf4_double_quantize(absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.nf4_double_quantize(absmax, code, blocksize)


def nf4_double_dequantize(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor,
                          offset: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    return ops.nf4_double_dequantize(qabsmax, nested_absmax, code, offset, blocksize)


def nf4_double_dequantize_into(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor,
                               offset: torch.Tensor, blocksize: int, out: torch.Tensor) -> torch.Tensor:
    """``nf4_double_dequantize`` written into ``out`` (fp32, contiguous, ``qabsmax.numel()`` elements);
    returns ``out``."""
    ops.nf4_double_dequantize_into(qabsmax, nested_absmax, code, offset, blocksize, out)
    return out


def nf4_matmul_raw(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for W stored as (packed, fp32 absmax, code); differentiable in x and bias."""
    return ops.nf4_matmul(x, packed, absmax, code, blocksize, out_features, bias)


def nf4_matmul_t_raw(grad: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     blocksize: int, in_features: int) -> torch.Tensor:
    """``grad @ W``: the input gradient of nf4_matmul."""
    return ops.nf4_matmul_t(grad, packed, absmax, code, blocksize, in_features)


# --- fakes ------------------------------------------------------------------------------------

def _blocks(n, blocksize):
    return (n + blocksize - 1) // blocksize


@torch.library.register_fake("peftx::nf4_quantize")
def _(weight, blocksize):
    torch._check(weight.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"nf4_quantize: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    n = weight.numel()
    return (weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            weight.new_empty((_blocks(n, blocksize),), dtype=torch.float32))


@torch.library.register_fake("peftx::nf4_dequantize")
def _(packed, absmax, code, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("peftx::nf4_double_quantize")
def _(absmax, code, blocksize):
    n = absmax.numel()
    return (absmax.new_empty((n,), dtype=torch.uint8), absmax.new_empty((_blocks(n, blocksize),)),
            absmax.new_empty(()))


@torch.library.register_fake("peftx::nf4_double_dequantize")
def _(qabsmax, nested_absmax, code, offset, blocksize):
    return nested_absmax.new_empty((qabsmax.numel(),))


@torch.library.register_fake("peftx::nf4_double_dequantize_into")
def _(qabsmax, nested_absmax, code, offset, blocksize, out):
    return None


@torch.library.register_fake("peftx::nf4_matmul")
def _(x, packed, absmax, code, blocksize, out_features, bias=None):
    torch._check(x.dim() >= 1, lambda: "nf4_matmul: x must have at least 1 dimension")
    torch._check(packed.numel() * 2 >= out_features * x.shape[-1],
                 lambda: f"nf4_matmul: x must have last dimension matching the weight, got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("peftx::nf4_matmul_t")
def _(grad, packed, absmax, code, blocksize, in_features):
    torch._check(grad.dim() >= 1, lambda: "nf4_matmul_t: grad must have at least 1 dimension")
    return grad.new_empty((*grad.shape[:-1], in_features))


# --- autograd ---------------------------------------------------------------------------------
# y = x W^T + b  =>  dx = g W (nf4_matmul_t), db = sum over leading dims of g. W is frozen (a
# quantized weight has no gradient); packed/absmax/code get None.

def _matmul_setup(ctx, inputs, output):
    x, packed, absmax, code, blocksize, out_features, bias = inputs
    ctx.save_for_backward(packed, absmax, code)
    ctx.blocksize = blocksize
    ctx.in_features = x.shape[-1]
    ctx.has_bias = bias is not None


def _matmul_backward(ctx, grad):
    packed, absmax, code = ctx.saved_tensors
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = ops.nf4_matmul_t(grad, packed, absmax, code, ctx.blocksize, ctx.in_features)
    if ctx.has_bias and ctx.needs_input_grad[6]:
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return dx, None, None, None, None, None, dbias


torch.library.register_autograd("peftx::nf4_matmul", _matmul_backward, setup_context=_matmul_setup)


def _matmul_t_setup(ctx, inputs, output):
    grad, packed, absmax, code, blocksize, in_features = inputs
    ctx.save_for_backward(packed, absmax, code)
    ctx.blocksize = blocksize
    ctx.out_features = grad.shape[-1]


def _matmul_t_backward(ctx, g):
    # dx = grad W  =>  d(grad) = g W^T
    packed, absmax, code = ctx.saved_tensors
    dgrad = ops.nf4_matmul(g, packed, absmax, code, ctx.blocksize, ctx.out_features, None)
    return dgrad, None, None, None, None, None


torch.library.register_autograd("peftx::nf4_matmul_t", _matmul_t_backward, setup_context=_matmul_t_setup)
