"""LoHa's weight update as autograd functions that keep only the factors for backward (the two
[out, in] Hadamard operands are rebuilt there: 2 rank-r products, cheap next to the token GEMMs),
and their plain-autograd twins (``*_ref``) that the tests compare them with.

``hada_weight``:    D = (w1a @ w1b) * (w2a @ w2b) * scale
                    w1a, w2a [out, r]; w1b, w2b [r, in]; scale a float or [out] row factors.
``hada_weight_cp``: D = R(t1, w1a, w1b) * R(t2, w2a, w2b) * scale, with the Tucker rebuild
                    R(t, wa, wb)[p, q, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, q]
                    t [r, r, kh, kw]; wa [r, out]; wb [r, in]; D [out, in, kh, kw].

``loha_linear``:    y = x (W + D)^T + bias with D = hada_weight(...): the Linear forward with the update
                    folded into the weight; saves x, W and the factors (not W + D [out, in]: it is
                    rebuilt in backward), so a LoHa Linear keeps no [out, in] tensor for backward.
                    Backward: dx = gy (W + D); dD = gy^T x (the one GEMM the update needs), then
                    as hada_weight below; dW = dD and dbias = sum gy only if they require grad.

Backward (G = dL/dD, S = scale broadcast over the rows):
  plain:  dP1 = G * S * P2,  dw1a = dP1 @ w1b^T,  dw1b = w1a^T @ dP1   (and 1 <-> 2)
  Tucker: G1 = G * S * R2,  U1 = t1 x_j w1b  [r, in, kh, kw],
          dw1a = <G1, U1> over (in, kh, kw),  dU1 = w1a x_p G1,
          dt1 = dU1 x_in w1b^T,  dw1b = <dU1, t1> over (r, kh, kw)        (and 1 <-> 2)
"""

from __future__ import annotations

import torch


def _rows(scale, ndim: int):
    """A float stays a float; an [out] tensor becomes [out, 1, ...] to scale the rows of D."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(-1, *([1] * (ndim - 1)))
    return scale


def _save(ctx, tensors, scale) -> None:
    # A row-scale tensor is saved like the factors; a float rides on ctx.
    ctx.scale_is_tensor = isinstance(scale, torch.Tensor)
    ctx.scale = None if ctx.scale_is_tensor else scale
    ctx.save_for_backward(*tensors, *((scale,) if ctx.scale_is_tensor else ()))


def _saved(ctx, n):
    saved = ctx.saved_tensors
    return saved[:n], (saved[n] if ctx.scale_is_tensor else ctx.scale)


class _HadaWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale):
        _save(ctx, (w1a, w1b, w2a, w2b), scale)
        return (w1a @ w1b) * (w2a @ w2b) * _rows(scale, 2)

    @staticmethod
    def backward(ctx, grad):
        (w1a, w1b, w2a, w2b), scale = _saved(ctx, 4)
        g = grad * _rows(scale, 2)
        dp1 = g * (w2a @ w2b)
        dp2 = g * (w1a @ w1b)
        return dp1 @ w1b.t(), w1a.t() @ dp1, dp2 @ w2b.t(), w2a.t() @ dp2, None


class _LoHaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w1a, w1b, w2a, w2b, scale):
        _save(ctx, (x, weight, w1a, w1b, w2a, w2b), scale)
        ctx.has_bias = bias is not None
        d = (w1a @ w1b) * (w2a @ w2b) * _rows(scale, 2)
        return torch.nn.functional.linear(x, weight + d, bias)

    @staticmethod
    def backward(ctx, gy):
        (x, weight, w1a, w1b, w2a, w2b), scale = _saved(ctx, 6)
        need = ctx.needs_input_grad
        p1, p2 = w1a @ w1b, w2a @ w2b
        s = _rows(scale, 2)
        g2 = gy.reshape(-1, gy.shape[-1])
        dx = gy @ (weight + p1 * p2 * s) if need[0] else None
        dd = g2.t() @ x.reshape(-1, x.shape[-1])
        dbias = g2.sum(0) if ctx.has_bias and need[2] else None
        gs = dd * s
        dp1, dp2 = gs * p2, gs * p1
        return (dx, dd if need[1] else None, dbias, dp1 @ w1b.t(), w1a.t() @ dp1, dp2 @ w2b.t(), w2a.t() @ dp2,
                None)


def _rebuild(t, wa, wb):
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


def _cp_grads(g1, t, wa, wb):
    u = torch.einsum("ijkl,jq->iqkl", t, wb)
    dwa = torch.einsum("pqkl,iqkl->ip", g1, u)
    du = torch.einsum("pqkl,ip->iqkl", g1, wa)
    return torch.einsum("iqkl,jq->ijkl", du, wb), dwa, torch.einsum("iqkl,ijkl->jq", du, t)


class _HadaWeightCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b, scale):
        _save(ctx, (t1, w1a, w1b, t2, w2a, w2b), scale)
        return _rebuild(t1, w1a, w1b) * _rebuild(t2, w2a, w2b) * _rows(scale, 4)

    @staticmethod
    def backward(ctx, grad):
        (t1, w1a, w1b, t2, w2a, w2b), scale = _saved(ctx, 6)
        g = grad * _rows(scale, 4)
        dt1, dw1a, dw1b = _cp_grads(g * _rebuild(t2, w2a, w2b), t1, w1a, w1b)
        dt2, dw2a, dw2b = _cp_grads(g * _rebuild(t1, w1a, w1b), t2, w2a, w2b)
        return dt1, dw1a, dw1b, dt2, dw2a, dw2b, None


def hada_weight(w1a, w1b, w2a, w2b, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """(w1a @ w1b) * (w2a @ w2b) * scale, [out, in]; backward keeps only the factors."""
    return _HadaWeight.apply(w1a, w1b, w2a, w2b, scale)


def hada_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The Tucker (effective conv2d) LoHa update, [out, in, kh, kw]; backward keeps only the factors."""
    return _HadaWeightCP.apply(t1, w1a, w1b, t2, w2a, w2b, scale)


def loha_linear(x, weight, bias, w1a, w1b, w2a, w2b, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """x (W + hada_weight(...))^T + bias; backward keeps no [out, in] tensor."""
    return _LoHaLinear.apply(x, weight, bias, w1a, w1b, w2a, w2b, scale)


def loha_linear_ref(x, weight, bias, w1a, w1b, w2a, w2b, scale=1.0):
    return torch.nn.functional.linear(x, weight + hada_weight_ref(w1a, w1b, w2a, w2b, scale), bias)


def hada_weight_ref(w1a, w1b, w2a, w2b, scale=1.0):
    return (w1a @ w1b) * (w2a @ w2b) * _rows(scale, 2)


def hada_weight_cp_ref(t1, w1a, w1b, t2, w2a, w2b, scale=1.0):
    return _rebuild(t1, w1a, w1b) * _rebuild(t2, w2a, w2b) * _rows(scale, 4)
