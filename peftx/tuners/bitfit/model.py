"""BitFitModel: trainable bias copies on the modules that have a bias (all of them, or the targeted
ones), with merge and unload; refuses models where nothing would train."""

from __future__ import annotations

import warnings

from torch import nn

from peftx.tuners.bitfit.config import BitFitConfig
from peftx.tuners.bitfit.layer import BitFitLayer, has_bias
from peftx.tuners.targets import _is_adapter_internal, _matches, _under, select_targets
from peftx.tuners.tuner import BaseTuner


class BitFitModel(BaseTuner):
    prefix = "bitfit_"
    layer_types = (BitFitLayer,)

    def select_targets(self, config: BitFitConfig, skip) -> list[str]:
        model = self.model
        if config.target_modules is None:
            named = [n for n, _ in model.named_modules()
                     if n and not _under(n, skip) and not _is_adapter_internal(n)
                     and not _matches(config.exclude_modules, n)]
        else:
            named = select_targets(model, config, skip=set(skip))
        chosen = [n for n in named if isinstance(model.get_submodule(n), BitFitLayer) or has_bias(model.get_submodule(n))]
        if config.target_modules is not None and len(chosen) < len(named):
            without = [n for n in named if n not in chosen]
            warnings.warn(f"BitFit: {len(without)} targeted modules have no bias and are skipped "
                          f"(e.g. {without[:3]})", stacklevel=3)
        if not chosen:
            where = "the targeted modules" if config.target_modules is not None else type(model).__name__
            raise ValueError(f"BitFit has nothing to train: no module of {where} has a bias (e.g. Llama-style "
                             "models have none); pick target_modules that have biases, or another method "
                             "(LoRA, IA3)")
        # Deepest first, so a module with a bias inside another one is wrapped before its parent.
        return sorted(chosen, key=lambda n: -n.count("."))

    def _create_layer(self, target: nn.Module, adapter_name: str, config: BitFitConfig, name: str) -> nn.Module:
        return BitFitLayer(target, adapter_name)

    def _add_to_layer(self, layer: BitFitLayer, adapter_name: str, config: BitFitConfig, name: str) -> None:
        layer.add_adapter(adapter_name)
