"""Bookkeeping shared by every LoRA layer: named adapters with their hyper-parameters, the active
set, validation of names and hyper-parameters (errors name the argument)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

BASE_ADAPTER = "__base__"  # in adapter_names: the row uses no adapter (as HF PEFT)


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_spec(r, lora_alpha, lora_dropout, use_rslora, use_dora=False) -> AdapterSpec:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
    return AdapterSpec(r, float(lora_alpha), float(lora_dropout), bool(use_rslora), use_dora)


def check_new_name(layer: nn.Module, name) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if "." in name:
        raise ValueError(f"adapter_name must not contain '.', got {name!r}")
    if name == BASE_ADAPTER:
        raise ValueError(f"adapter_name {name!r} is reserved: it means 'no adapter' in adapter_names")
    if name in layer.adapters:
        raise ValueError(f"adapter_name {name!r} already exists in this layer; delete it first or pick another name")
    if hasattr(nn.ModuleDict(), name) or hasattr(layer, name):
        raise ValueError(f"adapter_name {name!r} collides with an attribute name ({type(layer).__name__}.{name} "
                         f"or nn.ModuleDict.{name}); pick another name")
