"""TunerLayer: the bookkeeping every wrapping layer shares (the TunerLayer protocol of tuner.py): named
adapters in ``self.adapters``, the active set, enable/disable, deletion, and which parameters train.

A layer names its per-adapter containers (ModuleDict / ParameterDict attributes keyed by adapter name)
in ``adapter_containers``; active adapters' entries train, the others are frozen (as HF PEFT). It sets
``self.adapters``, ``self.active_adapters``, ``self.disable_adapters`` and, where it merges,
``self.merged_adapters`` in its constructor."""

from __future__ import annotations

from torch import nn


class TunerLayer(nn.Module):
    adapter_containers: tuple[str, ...] = ()

    # --- the base layer's tensors, for code that reads module.weight (weight tying, transformers utils)
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(getattr(self, "merged_adapters", ()))

    def _containers(self):
        return [getattr(self, c) for c in self.adapter_containers]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"adapter_names: unknown adapter {n!r}; this layer has {sorted(self.adapters)}")
        self.active_adapters = names
        self._sync_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; this layer has {sorted(self.adapters)}")
        if adapter_name in getattr(self, "merged_adapters", ()):
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge() before deleting it")
        for c in self._containers():
            if adapter_name in c:
                del c[adapter_name]
        del self.adapters[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled
        self._sync_requires_grad()

    def _sync_requires_grad(self) -> None:
        for n in self.adapters:
            train = n in self.active_adapters and not self.disable_adapters
            for c in self._containers():
                if n in c:
                    c[n].requires_grad_(train)
