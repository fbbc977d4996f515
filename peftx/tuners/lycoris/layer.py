"""LycorisLayer: what LoHa and LoKr layers share. A layer wraps (does not copy) a frozen
``nn.Linear`` or ``nn.Conv2d`` and adds a weight update ``delta W`` built from small factors; the
factors live in ``nn.ParameterDict``s named as in HF PEFT (``hada_w1_a``, ``lokr_w1``, …) so the
state-dict keys are HF PEFT's.

Forward (training and inference): when the adapter's dtype is the base weight's (fp32 models) the
update is folded into the weight, ``y = op(x, W + sum_a delta_a)``: one GEMM/convolution forward and
two backward (dx, dW_eff), where adding ``op(x, delta)`` to ``op(x, W)`` as HF PEFT does costs two
forward and three backward. With a low-precision base (adapters upcast to fp32, as HF PEFT) the
update is applied as ``op(x, W) + op(x.float(), delta)`` like HF PEFT, so the base product keeps its
dtype and the update its precision. Subclasses override ``_adapted_forward`` where they do better:
LoHa's Linear runs one autograd function that keeps no [out, in] tensor for backward, LoKr's Linear
never builds its Kronecker update.

Training-only regularisers, as HF PEFT: ``module_dropout`` skips an adapter for a whole forward with
that probability; ``rank_dropout`` zeroes rows (output features) of ``delta W`` (LoHa rescales the
kept rows by 1 / their mean; LoKr only with ``rank_dropout_scale``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftx.tuners.lora.adapters import check_new_name
from peftx.tuners.tuner_layer import TunerLayer

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LycorisSpec:
    r: int
    alpha: float
    rank_dropout: float
    module_dropout: float
    rank_dropout_scale: bool

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def check_base(base: nn.Module, method: str) -> None:
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"target module of type {type(base).__name__} is not supported by {method}; supported: "
                         "torch.nn.Linear, torch.nn.Conv2d")


class LycorisLayer(TunerLayer):
    """Named adapters over a frozen ``base_layer``; subclasses create the factors and build deltas."""

    param_names: tuple[str, ...] = ()  # the ParameterDicts holding the factors (HF PEFT's names)
    method = ""

    @property
    def adapter_containers(self) -> tuple[str, ...]:
        return self.param_names

    @staticmethod
    def _default_config(r: int, alpha: float):
        """The method's config for a layer built without one (its keyword defaults)."""
        raise NotImplementedError

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, alpha: float = 8,
                 config=None, autocast_adapter_dtype: bool = True):
        super().__init__()
        check_base(base_layer, self.method)
        self.base_layer = base_layer
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for n in self.param_names:
            setattr(self, n, nn.ParameterDict())
        self.adapters: dict[str, LycorisSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, r, alpha, config if config is not None else self._default_config(r, alpha),
                         autocast_adapter_dtype)

    # --- HF PEFT-style views of the hyper-parameters ----------------------------------------------
    @property
    def r(self) -> dict[str, int]:
        return {k: v.r for k, v in self.adapters.items()}

    @property
    def alpha(self) -> dict[str, float]:
        return {k: v.alpha for k, v in self.adapters.items()}

    @property
    def scaling(self) -> dict[str, float]:
        return {k: v.scaling for k, v in self.adapters.items()}

    # --- adapter management -----------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, r: int, alpha: float, config, autocast_adapter_dtype: bool = True) -> None:
        """Adds adapter ``adapter_name`` (hyper-parameters from ``config``, a LoHa/LoKr config); the
        first one added becomes active. Factors are fp32 over a fp16/bf16 base, as HF PEFT."""
        check_new_name(self, adapter_name)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        spec = LycorisSpec(r, float(alpha), float(config.rank_dropout), float(config.module_dropout),
                           bool(getattr(config, "rank_dropout_scale", True)))
        w = self.base_layer.weight
        dtype = torch.float32 if autocast_adapter_dtype and w.dtype in _LOW_PRECISION else w.dtype
        self._create_factors(adapter_name, r, config, w.device, dtype)
        self.adapters[adapter_name] = spec
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._sync_requires_grad()

    def _create_factors(self, name: str, r: int, config, device, dtype) -> None:
        raise NotImplementedError

    def _factors(self, name: str) -> list[nn.Parameter]:
        return [getattr(self, p)[name] for p in self.param_names if name in getattr(self, p)]

    # --- the update ---------------------------------------------------------------------------------
    def _delta(self, name: str, scale: float | torch.Tensor) -> torch.Tensor:
        """``delta W`` of adapter ``name`` in the adapters' dtype, shaped like the base weight, times
        ``scale`` (a float, or a [out_features] tensor of row factors)."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``delta W`` (scaling included) in the adapters' dtype, shaped like the base weight."""
        return self._delta(adapter_name, self.adapters[adapter_name].scaling)

    def _adapter_dtype(self, name: str) -> torch.dtype:
        return self._factors(name)[0].dtype

    def _row_scale(self, name: str) -> float | torch.Tensor:
        """The scaling, times a rank-dropout row mask in training (HF PEFT's draw: torch.rand on the CPU)."""
        spec = self.adapters[name]
        if not (self.training and spec.rank_dropout > 0):
            return spec.scaling
        keep = (torch.rand(self.out_features) > spec.rank_dropout).to(torch.float32)
        if spec.rank_dropout_scale:
            keep = keep / keep.mean().clamp_min(1.0 / self.out_features)  # all rows dropped: zeros, not NaN
        return (keep * spec.scaling).to(self.base_layer.weight.device, self._adapter_dtype(name))

    # --- merging ----------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        w = self.base_layer.weight
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"adapter_names: unknown adapter {n!r}; this layer has {sorted(self.adapters)}")
            if n in self.merged_adapters:
                warnings.warn(f"adapter {n!r} is already merged; skipping it", stacklevel=2)
                continue
            with torch.no_grad():
                merged = w.float() + self.get_delta_weight(n).float()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {n!r} produces NaN or inf in the base weight; it was not merged")
                w.copy_(merged.to(w.dtype))
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        w = self.base_layer.weight
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            with torch.no_grad():
                w.copy_((w.float() - self.get_delta_weight(n).float()).to(w.dtype))

    # --- forward ----------------------------------------------------------------------------------
    def _base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's product with another weight (its stride/padding/... for a Conv2d)."""
        if not self.is_conv:
            return F.linear(x, weight, bias)
        b = self.base_layer
        if b.padding_mode != "zeros":
            x = F.pad(x, b._reversed_padding_repeated_twice, mode=b.padding_mode)
            return F.conv2d(x, weight, bias, b.stride, 0, b.dilation, b.groups)
        return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation, b.groups)

    def _kept(self, names: list[str]) -> list[str]:
        """Module dropout (training only): each adapter is skipped for this forward with its probability."""
        if not self.training:
            return names
        return [n for n in names if not (self.adapters[n].module_dropout > 0
                                         and torch.rand(1).item() <= self.adapters[n].module_dropout)]

    def _adapted_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        w = self.base_layer.weight
        deltas = [self._delta(n, self._row_scale(n)) for n in names]
        delta = sum(deltas[1:], deltas[0])
        if delta.dtype == w.dtype:
            return self._base_op(x, w + delta, self.base_layer.bias)
        y = self.base_layer(x)
        return (y + self._base_op(x.to(delta.dtype), delta, None)).to(x.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.is_conv:
            if x.dim() not in (3, 4) or x.shape[-3] != self.in_features:
                raise ValueError(f"x must have shape [N, {self.in_features}, H, W] (in_channels), got {tuple(x.shape)}")
        elif x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        active = self._kept(active)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, active)

    def extra_repr(self) -> str:
        return f"adapters={ {n: (s.r, s.alpha) for n, s in self.adapters.items()} }, active={self.active_adapters}"
