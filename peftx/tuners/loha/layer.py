"""LoHa layers (low-rank Hadamard product, FedPara): ``delta W = (w1a w1b) * (w2a w2b) * alpha / r``
over a frozen ``nn.Linear`` (``LoHaLinear``) or ``nn.Conv2d`` (``LoHaConv2d``).

Factors and state-dict keys as HF PEFT: Linear ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in] (and
``w2``); a Conv2d is treated as the matrix [out, in/groups * kh * kw] unless ``use_effective_conv2d``
(kernel > 1x1), where ``hada_t1``/``hada_t2`` [r, r, kh, kw] are Tucker cores and ``hada_w*_a`` [r, out],
``hada_w*_b`` [r, in/groups]. Init as HF PEFT: everything kaiming-uniform (a = sqrt 5) except
``hada_w2_b = 0``, so ``delta W = 0`` and the output equals the base layer's; ``init_weights=False``
draws all factors. The forward folds ``delta W`` into the weight (see peftx/tuners/lycoris/layer.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftx.tuners.loha.config import LoHaConfig
from peftx.tuners.loha.functional import hada_weight, hada_weight_cp, loha_linear
from peftx.tuners.lycoris.layer import LycorisLayer


class LoHaLayer(LycorisLayer):
    param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    method = "LoHa"

    @staticmethod
    def _default_config(r, alpha):
        return LoHaConfig(r=r, alpha=alpha)

    def _create_factors(self, name, r, config, device, dtype):
        base = self.base_layer
        out = self.out_features
        kw = dict(device=device, dtype=dtype)
        if self.is_conv:
            cin = base.in_channels // base.groups
            kh, kwid = base.kernel_size
            effective = config.use_effective_conv2d and (kh, kwid) != (1, 1)
        else:
            cin, kh, kwid, effective = self.in_features, 1, 1, False
        if effective:
            shapes = {"hada_t1": (r, r, kh, kwid), "hada_w1_a": (r, out), "hada_w1_b": (r, cin),
                      "hada_t2": (r, r, kh, kwid), "hada_w2_a": (r, out), "hada_w2_b": (r, cin)}
        else:
            shapes = {"hada_w1_a": (out, r), "hada_w1_b": (r, cin * kh * kwid),
                      "hada_w2_a": (out, r), "hada_w2_b": (r, cin * kh * kwid)}
        for pname, shape in shapes.items():
            p = nn.Parameter(torch.empty(shape, **kw))
            if pname == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            getattr(self, pname)[name] = p

    def _delta(self, name, scale):
        if name in self.hada_t1:
            return hada_weight_cp(self.hada_t1[name], self.hada_w1_a[name], self.hada_w1_b[name],
                                  self.hada_t2[name], self.hada_w2_a[name], self.hada_w2_b[name], scale)
        d = hada_weight(self.hada_w1_a[name], self.hada_w1_b[name], self.hada_w2_a[name], self.hada_w2_b[name], scale)
        return d.reshape(self.base_layer.weight.shape)


class LoHaLinear(LoHaLayer):
    """LoHa over an ``nn.Linear``; one active adapter with the base's dtype runs ``loha_linear`` (the
    update folded into the weight, nothing [out, in] kept for backward)."""

    def __init__(self, base_layer: nn.Linear, *args, **kwargs):
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer must be a torch.nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, *args, **kwargs)

    def _adapted_forward(self, x, names):
        base = self.base_layer
        if len(names) > 1 or self._adapter_dtype(names[0]) != base.weight.dtype or \
                torch.is_autocast_enabled(x.device.type):  # autocast: plain autograd casts per op
            return super()._adapted_forward(x, names)
        n = names[0]
        return loha_linear(x, base.weight, base.bias, self.hada_w1_a[n], self.hada_w1_b[n], self.hada_w2_a[n],
                           self.hada_w2_b[n], self._row_scale(n))


class LoHaConv2d(LoHaLayer):
    """LoHa over an ``nn.Conv2d`` (plain or Tucker-factored kernel, see ``use_effective_conv2d``)."""

    def __init__(self, base_layer: nn.Conv2d, *args, **kwargs):
        if not isinstance(base_layer, nn.Conv2d):
            raise ValueError(f"base_layer must be a torch.nn.Conv2d, got {type(base_layer).__name__}")
        super().__init__(base_layer, *args, **kwargs)
