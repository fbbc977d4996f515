"""LycorisModel: the BaseTuner of LoHa and LoKr: per-module rank/alpha from the patterns, the layer
class chosen by the target's type (a table, not an isinstance chain), an error naming the supported
types otherwise."""

from __future__ import annotations

from torch import nn

from peftx.tuners.targets import pattern_value
from peftx.tuners.tuner import BaseTuner


class LycorisModel(BaseTuner):
    method = ""
    layer_for: dict[type, type] = {}  # base module type -> wrapping layer class

    def _create_layer(self, target: nn.Module, adapter_name: str, config, name: str) -> nn.Module:
        r, alpha = self._rank_alpha(config, name)
        for base_type, layer_cls in self.layer_for.items():
            if isinstance(target, base_type):
                return layer_cls(target, adapter_name, r, alpha, config)
        supported = ", ".join(f"torch.nn.{t.__name__}" for t in self.layer_for)
        raise ValueError(f"target module {name!r} of type {type(target).__name__} is not supported by "
                         f"{self.method}; supported: {supported}")

    def _add_to_layer(self, layer: nn.Module, adapter_name: str, config, name: str) -> None:
        r, alpha = self._rank_alpha(config, name)
        layer.add_adapter(adapter_name, r, alpha, config)

    @staticmethod
    def _rank_alpha(config, name: str) -> tuple[int, float]:
        return (pattern_value(config.rank_pattern, name, config.r),
                pattern_value(config.alpha_pattern, name, config.alpha))
