"""LoKr layers (low-rank Kronecker product): ``delta W = kron(W1, W2) * alpha / r`` over a frozen
``nn.Linear`` (``LoKrLinear``) or ``nn.Conv2d`` (``LoKrConv2d``).

Shapes as HF PEFT (and its state-dict keys): out = a * b and in = c * d with (a, b) =
``factorization(out)``, (c, d) = ``factorization(in / groups)``; W1 [a, c] is ``lokr_w1`` or, with
``decompose_both`` and r < max(a, c) / 2, ``lokr_w1_a`` [a, r] @ ``lokr_w1_b`` [r, c]; W2 [b, d] is
``lokr_w2`` unless r < max(b, d) / 2, then ``lokr_w2_a`` [b, r] @ ``lokr_w2_b`` [r, d]. For a Conv2d
W2 also carries the kernel: ``lokr_w2`` [b, d, kh, kw], or ``lokr_w2_b`` [r, d * kh * kw], or with
``use_effective_conv2d`` a Tucker core ``lokr_t2`` [r, r, kh, kw] with ``lokr_w2_a`` [r, b],
``lokr_w2_b`` [r, d]. Init as HF PEFT: W1 (or w1_a) zero, the rest kaiming-uniform (a = sqrt 5), so
``delta W = 0``; ``init_weights="lycoris"`` zeroes W2 (or w2_b) instead; False draws everything.

Linear forward: the update is never built. With x viewed as X [M, c, d] per token,
``kron(W1, W2) x = vec(W1 X W2^T)``: two small products costing M * (in * b + out * c) multiply-adds
instead of M * in * out (for a 4096 x 4096 layer split 64 x 64, 32x fewer), and backward likewise
(autograd through the two products). Conv2d folds the (small) materialised update into the kernel
(peftx/tuners/lycoris/layer.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftx.tuners.lokr.config import LoKrConfig
from peftx.tuners.lycoris.layer import LycorisLayer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Splits ``dimension`` as m * n, HF PEFT's (LyCORIS') rule: ``(factor, dimension / factor)`` when
    factor > 0 divides it (in that order); otherwise the divisor pair (m <= n) reached by walking the
    divisors m upward while m < n and m <= factor (factor -1: no bound), i.e. nearest sqrt(dimension).
    factorization(256) = (16, 16), (128) = (8, 16), (127) = (1, 127), (128, 4) = (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    d = 2
    while m < n and d <= dimension:
        if dimension % d == 0:
            if d > limit:
                break
            m, n = d, dimension // d
        d += 1
    return (m, n) if m <= n else (n, m)


def _tucker(t, wa, wb):
    # [r, r, kh, kw] core with wa [r, b], wb [r, d] -> [b, d, kh, kw]
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


def lokr_linear_term(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x @ kron(w1, w2)^T`` without building the Kronecker product: x [..., c * d], w1 [a, c],
    w2 [b, d] -> [..., a * b]. Per token X [c, d]: Y = w1 X w2^T, as one GEMM over all tokens
    (T = X w2^T, [M * c, d] x [d, b]) and one batched product with w1 broadcast (no copy). mm and
    bmm, not matmul: matmul's folding depends on requires_grad, and the result must not."""
    a, c = w1.shape
    b, d = w2.shape
    lead = x.shape[:-1]
    t = torch.mm(x.reshape(-1, d), w2.t()).view(-1, c, b)      # [M, c, b]
    y = torch.bmm(w1.expand(t.shape[0], a, c), t)               # [M, a, b]
    return y.reshape(*lead, a * b)


def lokr_linear_term_ref(x, w1, w2):
    return x @ torch.kron(w1, w2).t()


class LoKrLayer(LycorisLayer):
    param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    method = "LoKr"

    @staticmethod
    def _default_config(r, alpha):
        return LoKrConfig(r=r, alpha=alpha)

    def _create_factors(self, name, r, config, device, dtype):
        base = self.base_layer
        cin = base.in_channels // base.groups if self.is_conv else self.in_features
        a, b = factorization(self.out_features, config.decompose_factor)
        c, d = factorization(cin, config.decompose_factor)
        kernel = tuple(base.kernel_size) if self.is_conv else ()
        use_w1 = not (config.decompose_both and r < max(a, c) / 2)
        use_w2 = not (r < max(b, d) / 2)
        effective = self.is_conv and config.use_effective_conv2d and kernel != (1, 1)
        shapes = {"lokr_w1": (a, c)} if use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        if use_w2:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif effective:
            shapes.update(lokr_t2=(r, r, *kernel), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
        else:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        # Which factor starts at zero (delta W = 0): W1's first for True, W2's last for "lycoris".
        zero = {True: {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}}.get(config.init_weights, set())
        for pname, shape in shapes.items():
            p = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            if pname in zero:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            getattr(self, pname)[name] = p

    def _w1_w2(self, name):
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = _tucker(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def _delta(self, name, scale):
        w1, w2 = self._w1_w2(name)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        weight = self.base_layer.weight
        d = torch.kron(w1, w2).reshape(weight.shape)
        return d * (scale.reshape(-1, *([1] * (d.dim() - 1))) if isinstance(scale, torch.Tensor) else scale)


class LoKrLinear(LoKrLayer):
    """LoKr over an ``nn.Linear``; the forward applies W1 and W2 to the tokens (no Kronecker product)."""

    def __init__(self, base_layer: nn.Linear, *args, **kwargs):
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer must be a torch.nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, *args, **kwargs)

    def _adapted_forward(self, x, names):
        y = self.base_layer(x)
        term = None
        for n in names:
            w1, w2 = self._w1_w2(n)
            scale = self._row_scale(n)
            if not isinstance(scale, torch.Tensor):
                w1 = w1 * scale  # [a, c]: scaling folded into the smaller factor
            t = lokr_linear_term(x.to(w1.dtype), w1, w2)
            if isinstance(scale, torch.Tensor):
                t = t * scale
            term = t if term is None else term + t
        return (y + term).to(x.dtype)


class LoKrConv2d(LoKrLayer):
    """LoKr over an ``nn.Conv2d`` (the update folded into the kernel)."""

    def __init__(self, base_layer: nn.Conv2d, *args, **kwargs):
        if not isinstance(base_layer, nn.Conv2d):
            raise ValueError(f"base_layer must be a torch.nn.Conv2d, got {type(base_layer).__name__}")
        super().__init__(base_layer, *args, **kwargs)
