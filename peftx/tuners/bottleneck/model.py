"""BottleneckModel: puts bottleneck adapters at the sites of the config's placement (placements.py)
and manages them model-wide. Adapters cannot be merged into the base weights (they are non-linear):
``merge_and_unload`` raises, ``unload`` returns the untouched base model."""

from __future__ import annotations

from torch import nn

from peftx.tuners.bottleneck.config import AdapterConfig
from peftx.tuners.bottleneck.layer import BottleneckLayer
from peftx.tuners.bottleneck.placements import Site, plan_sites
from peftx.tuners.tuner import BaseTuner


def adapter_kwargs(config, gated: bool = False) -> dict:
    return dict(reduction_factor=config.reduction_factor, bottleneck_size=config.bottleneck_size,
                non_linearity=config.non_linearity, scaling=config.scaling, adapter_dropout=config.adapter_dropout,
                form=config.form, gated=gated)


class BottleneckModel(BaseTuner):
    prefix = "bottleneck_"
    layer_types = (BottleneckLayer,)
    supports_merge = False
    gated = False  # UniPELT's adapters are gated

    def select_targets(self, config: AdapterConfig, skip) -> list[str]:
        self._sites: dict[str, Site] = {s.name: s for s in plan_sites(self.model, config, skip=set(skip))}
        return list(self._sites)

    def _create_layer(self, target: nn.Module, adapter_name: str, config, name: str) -> nn.Module:
        site = self._sites[name]
        layer = BottleneckLayer(target, self.model.get_submodule(site.input_name))
        layer.add_adapter(adapter_name, **adapter_kwargs(config, self.gated))
        return layer

    def _add_to_layer(self, layer: nn.Module, adapter_name: str, config, name: str) -> None:
        layer.add_adapter(adapter_name, **adapter_kwargs(config, self.gated))

    def _replace_wrappers(self, merge: bool, adapter_names=None) -> nn.Module:
        if merge and not self.supports_merge:
            raise ValueError(f"{type(self).__name__}: bottleneck adapters are non-linear and cannot be merged into "
                             "the base weights; use unload() to get the base model back (without the adapters)")
        for m in self.adapter_layers():
            if isinstance(m, BottleneckLayer):
                m.remove_hook()
        return super()._replace_wrappers(merge, adapter_names)
