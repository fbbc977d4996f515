"""UniPELTModel: the tuner part of UniPELT -- gated LoRA on the LoRA targets and gated sequential
bottleneck adapters at the placement's sites, in one tuner (the prefix part lives in the PeftModel,
peftx/composed_model.py)."""

from __future__ import annotations

from torch import nn

from peftx.tuners.bottleneck.layer import BottleneckLayer
from peftx.tuners.bottleneck.model import BottleneckModel
from peftx.tuners.targets import DEFAULT_TARGET_MODULES, _is_conv1d, select_targets
from peftx.tuners.unipelt.config import UniPELTConfig
from peftx.tuners.unipelt.gated_lora import GatedLoraLinear


class UniPELTModel(BottleneckModel):
    prefix = ("lora_", "bottleneck_")
    layer_types = (BottleneckLayer, GatedLoraLinear)
    gated = True

    def select_targets(self, config: UniPELTConfig, skip) -> list[str]:
        adapters = super().select_targets(config, skip)
        lora = select_targets(self.model, config, skip=set(skip), defaults=DEFAULT_TARGET_MODULES)
        both = sorted(set(adapters) & set(lora))
        if both:
            raise ValueError(f"target_modules {both} are also adapter sites (the sublayer output projections); a "
                             "module takes either LoRA or an adapter in UniPELT: change target_modules")
        self._lora_targets = set(lora)
        return lora + adapters

    def _create_layer(self, target: nn.Module, adapter_name: str, config: UniPELTConfig, name: str) -> nn.Module:
        if name not in self._lora_targets:
            return super()._create_layer(target, adapter_name, config, name)
        if not (isinstance(target, nn.Linear) or _is_conv1d(target)) or type(target).__name__ == "Linear4bit":
            raise ValueError(f"target_modules: {name!r} is a {type(target).__name__}; UniPELT's gated LoRA wraps "
                             "torch.nn.Linear or transformers Conv1D")
        return GatedLoraLinear(target, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                               fan_in_fan_out=_is_conv1d(target), adapter_name=adapter_name)

    def _add_to_layer(self, layer: nn.Module, adapter_name: str, config: UniPELTConfig, name: str) -> None:
        if name not in self._lora_targets:
            return super()._add_to_layer(layer, adapter_name, config, name)
        layer.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout)
