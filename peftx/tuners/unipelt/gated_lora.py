"""GatedLoraLinear: LoRA whose low-rank term is scaled per token by a learned gate (UniPELT, Mao et al.
2022): ``y = base(x) + sigmoid(gate(x)) * scaling * B A dropout(x)``, gate Linear [in -> 1] with a
zero bias (so the gate starts at about 0.5; B is zero at init, so the output is the base layer's).

Keys: LoRA's (``lora_A.<adapter>``, ``lora_B.<adapter>``) plus ``lora_gate.<adapter>.{weight,bias}``.
The gate depends on the input, so the layer cannot be merged into the base weight."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftx.tuners.lora.layer import LoraLinear


class GatedLoraLinear(LoraLinear):
    """LoraLinear over an ``nn.Linear`` or transformers ``Conv1D`` with a per-token gate per adapter."""

    def add_adapter(self, adapter_name: str, *args, **kwargs) -> None:
        if "lora_gate" not in self._modules:
            self.lora_gate = nn.ModuleDict()
        super().add_adapter(adapter_name, *args, **kwargs)
        A = self.lora_A[adapter_name].weight
        gate = nn.Linear(self.in_features, 1, device=A.device, dtype=A.dtype)
        nn.init.zeros_(gate.bias)
        self.lora_gate[adapter_name] = gate
        self._sync_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.lora_gate[adapter_name]

    def _sync_requires_grad(self) -> None:
        super()._sync_requires_grad()
        for n, gate in getattr(self, "lora_gate", {}).items():
            gate.requires_grad_(n in self.active_adapters and not self.disable_adapters)

    def gate(self, x: torch.Tensor, name: str) -> torch.Tensor:
        g = self.lora_gate[name]
        return torch.sigmoid(F.linear(x.to(g.weight.dtype), g.weight, g.bias))

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        if adapter_names is not None:
            raise ValueError("adapter_names (mixed-adapter batches) is not supported by gated LoRA (UniPELT); "
                             "set_adapter() one adapter per batch")
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be a tensor of shape [..., {self.in_features}] (in_features), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        for n in self.active_adapters:
            if n in self.adapters:
                y = y + (self.gate(x, n) * self._lora_term(x, n).float()).to(y.dtype)
        return y

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        raise ValueError("gated LoRA (UniPELT) cannot be merged into the base weight: its gate depends on the input")
