"""``BitFitLayer``: a trainable copy of a frozen module's bias, per adapter.

The wrapped module (any module with a ``bias`` parameter: Linear, GPT-2 Conv1D, LayerNorm, Conv) runs
with its bias swapped for the adapter's (``torch.func.functional_call``), so the output is exactly the
base module's at init and the adapter's file holds only biases (``bitfit_bias``). Several active
adapters add their changes: ``b + sum_i (b_i - b)``. Merging writes the bias into the base module
(unmerge restores the original bytes)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call

from peftx.tuners.lora.adapters import check_new_name
from peftx.tuners.tuner_layer import TunerLayer


def has_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), nn.Parameter)


class BitFitLayer(TunerLayer):
    adapter_containers = ("bitfit_bias",)
    def __init__(self, base: nn.Module, adapter_name: str = "default"):
        super().__init__()
        if not has_bias(base):
            raise TypeError(f"base must have a bias parameter for BitFit; {type(base).__name__} has none")
        self.base_layer = base
        self.bitfit_bias = nn.ParameterDict()
        self.adapters: dict[str, None] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._bias_before_merge: list[torch.Tensor] = []
        self.disable_adapters = False
        for p in base.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name)

    def __getattr__(self, name):
        # Code around the model reads attributes of the module it expects (eps, in_features, weight, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def add_adapter(self, adapter_name: str) -> None:
        check_new_name(self, adapter_name)
        b = self.base_layer.bias.detach()
        dtype = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype
        self.bitfit_bias[adapter_name] = nn.Parameter(b.to(dtype).clone())
        self.adapters[adapter_name] = None
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._sync_requires_grad()

    def _bias(self, names: list[str]) -> torch.Tensor:
        if len(names) == 1:
            return self.bitfit_bias[names[0]]
        base = self.base_layer.bias
        return base + sum(self.bitfit_bias[n] - base for n in names)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)]
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"adapter_names: unknown adapter {n!r}; this layer has {sorted(self.adapters)}")
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            warnings.warn("the adapters are already merged; nothing to do", stacklevel=2)
            return
        if self.merged_adapters:
            raise ValueError("BitFit merges one set of adapters at a time; unmerge() first")
        b = self.base_layer.bias
        new = self._bias(names).detach().to(b.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"merging adapters {names} produces NaN or inf in the bias; nothing was merged")
        self._bias_before_merge.append(b.data.clone())
        b.data.copy_(new)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if self._bias_before_merge:
            self.base_layer.bias.data.copy_(self._bias_before_merge.pop())
        self.merged_adapters.clear()

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = [n for n in self.active_adapters if n in self.adapters]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        bias = self._bias(active).to(self.base_layer.bias.dtype)
        return functional_call(self.base_layer, {"bias": bias}, args, kwargs)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.adapters)}, active={self.active_adapters}"
