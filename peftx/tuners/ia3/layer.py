"""``IA3Linear``: (IA)^3 learned scaling vectors over a frozen ``nn.Linear`` or GPT-2 ``Conv1D``.

Per adapter, as HF PEFT (same name and shapes): ``ia3_l`` [out, 1] scales the output of an attention
projection, ``y = base(x) * l``; for a feed-forward module ``ia3_l`` [1, in] scales the input,
``y = base(x * l)``. Ones at init, so the output equals the base layer's. Several active adapters
multiply their vectors. Merging scales the weight's rows (output side, and the bias) or columns
(input side); unmerging divides them back (exact up to rounding, HF PEFT's rule)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftx.tuners.lora.adapters import check_new_name
from peftx.tuners.targets import _is_conv1d
from peftx.tuners.tuner_layer import TunerLayer


class IA3Linear(TunerLayer):
    adapter_containers = ("ia3_l",)
    def __init__(self, base: nn.Module, is_feedforward: bool = False, init_ia3_weights: bool = True,
                 adapter_name: str = "default"):
        super().__init__()
        conv1d = _is_conv1d(base)
        if not (isinstance(base, nn.Linear) or conv1d) or type(base).__name__ == "Linear4bit":
            raise TypeError(f"base must be a torch.nn.Linear or transformers Conv1D, got {type(base).__name__}")
        self.base_layer = base
        self.fan_in_fan_out = conv1d
        self.in_features, self.out_features = base.weight.shape if conv1d else base.weight.shape[::-1]
        self.is_feedforward = bool(is_feedforward)
        self.ia3_l = nn.ParameterDict()
        self.adapters: dict[str, None] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        for p in base.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, init_ia3_weights)

    def add_adapter(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        check_new_name(self, adapter_name)
        w = self.base_layer.weight
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        v = torch.ones(shape, device=w.device, dtype=dtype) if init_ia3_weights else \
            torch.randn(shape, device=w.device, dtype=dtype)
        self.ia3_l[adapter_name] = nn.Parameter(v)
        self.adapters[adapter_name] = None
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._sync_requires_grad()

    # --- merging ---------------------------------------------------------------------------------
    def _weight_factor(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast over the stored weight ([out, in], or [in, out] for Conv1D)."""
        v = self.ia3_l[name].data
        return v.t() if self.fan_in_fan_out else v

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        base = self.base_layer
        for n in list(self.active_adapters if adapter_names is None else adapter_names):
            if n not in self.adapters:
                raise ValueError(f"adapter_names: unknown adapter {n!r}; this layer has {sorted(self.adapters)}")
            if n in self.merged_adapters:
                warnings.warn(f"adapter {n!r} is already merged; skipping it", stacklevel=2)
                continue
            w = (base.weight.data * self._weight_factor(n)).to(base.weight.dtype)
            b = None
            if not self.is_feedforward and base.bias is not None:
                b = (base.bias.data * self.ia3_l[n].data.view(-1)).to(base.bias.dtype)
            if safe_merge and not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
                raise ValueError(f"merging adapter {n!r} produces NaN or inf in the base weight; it was not merged")
            base.weight.data = w
            if b is not None:
                base.bias.data = b
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        base = self.base_layer
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            base.weight.data = (base.weight.data / (self._weight_factor(n) + 1e-8)).to(base.weight.dtype)
            if not self.is_feedforward and base.bias is not None:
                base.bias.data = (base.bias.data / (self.ia3_l[n].data.view(-1) + 1e-8)).to(base.bias.dtype)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[active[0]].view(-1)
        for n in active[1:]:
            scale = scale * self.ia3_l[n].view(-1)
        if self.is_feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return (y * scale).to(y.dtype)

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return f"scales={side}, adapters={sorted(self.adapters)}, active={self.active_adapters}"
