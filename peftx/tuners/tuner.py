"""BaseTuner: what every method that wraps a model's modules shares (LoRA, AdaLoRA, LoHa, LoKr, IA3,
bottleneck adapters, …): injecting its layers into the target modules, the model-wide adapter state
(active adapter, enable/disable, delete), which parameters train, merge and unload, and the keys of
its tensors in HF PEFT's adapter files.

A method subclasses BaseTuner and sets
- ``prefix``: the start of the names of the adapter's parameters and sub-modules inside a wrapped layer
  (``"lora_"``, ``"hada_"``, …; a tuple for a method that injects layers of several kinds, e.g.
  UniPELT's ``("lora_", "bottleneck_")``). Saved keys are the state-dict keys holding it, with
  ``.<adapter>`` removed, exactly as HF PEFT names them.
- ``layer_types``: the classes of its wrapping layers (they follow the TunerLayer protocol below).
- ``default_targets``: its target table by transformers model_type (used when target_modules is None).
and implements ``_create_layer`` (wrap a base module) and ``_add_to_layer`` (a new adapter in a layer
the method already wraps).

TunerLayer protocol (what BaseTuner calls on a wrapping layer): ``base_layer``; ``adapters`` (a mapping
whose keys are the adapter names it holds); ``active_adapters`` (list of names);
``set_adapter(names)``; ``delete_adapter(name)``; ``enable_adapters(enabled)``; ``merge(names)`` and
``unmerge()`` where the method supports merging; optionally ``_sync_requires_grad()``.
"""

from __future__ import annotations

from torch import nn

from peftx.tuners.targets import ADAPTER_PREFIXES, select_targets
from peftx.utils_modules import ModulesToSaveWrapper, get_parent


class BaseTuner(nn.Module):
    prefix: str | tuple[str, ...] = ""
    layer_types: tuple[type, ...] = ()
    default_targets: dict[str, list[str]] | None = None
    supports_merge: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ADAPTER_PREFIXES.update(p for p in ((cls.prefix,) if isinstance(cls.prefix, str) else cls.prefix) if p)

    def __init__(self, model: nn.Module, peft_config: dict, adapter_name: str, skip: set[str] = frozenset()):
        super().__init__()
        self.model = model
        self.peft_config = peft_config
        self.inject_adapter(adapter_name, skip)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- injection ---------------------------------------------------------------------------------
    def select_targets(self, config, skip: set[str]) -> list[str]:
        return select_targets(self.model, config, skip=set(skip), defaults=self.default_targets)

    def inject_adapter(self, adapter_name: str, skip: set[str] = frozenset()) -> list[str]:
        config = self.peft_config[adapter_name]
        targets = self.select_targets(config, skip)
        for name in targets:
            target = self.model.get_submodule(name)
            if isinstance(target, self.layer_types):
                self._add_to_layer(target, adapter_name, config, name)
                continue
            parent, child = get_parent(self.model, name)
            setattr(parent, child, self._create_layer(target, adapter_name, config, name))
        self._mark_trainable(adapter_name)
        return targets

    def _create_layer(self, target: nn.Module, adapter_name: str, config, name: str) -> nn.Module:
        raise NotImplementedError

    def _add_to_layer(self, layer: nn.Module, adapter_name: str, config, name: str) -> None:
        raise NotImplementedError

    def _mark_trainable(self, adapter_name: str) -> None:
        """Freezes everything but adapter parameters and modules_to_save copies, then lets the method
        unfreeze more (``_mark_extra_trainable``, e.g. biases)."""
        for name, p in self.model.named_parameters():
            if not self.owns(name) and ".modules_to_save." not in name:
                p.requires_grad_(False)
        self._mark_extra_trainable(self.peft_config[adapter_name])
        self.set_adapter(self.active_adapters_or(adapter_name))

    def _mark_extra_trainable(self, config) -> None:
        pass

    def active_adapters_or(self, default: str) -> list[str]:
        for m in self.adapter_layers():
            return m.active_adapters or [default]
        return [default]

    # --- model-wide adapter state -----------------------------------------------------------------
    def adapter_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, self.layer_types)]

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"adapter_name: unknown adapter {n!r}; this model has {sorted(self.peft_config)}")
        for m in self.adapter_layers():
            m.active_adapters = [n for n in names if n in m.adapters]
            if hasattr(m, "_sync_requires_grad"):
                m._sync_requires_grad()
        for m in self.model.modules():
            if isinstance(m, ModulesToSaveWrapper):
                m.set_adapter(names[0])
        for n, config in self.peft_config.items():
            if config.inference_mode:
                self._freeze(n)

    def _freeze(self, adapter_name: str) -> None:
        for name, p in self.model.named_parameters():
            if f".{adapter_name}." in name + "." and (self.owns(name) or ".modules_to_save." in name):
                p.requires_grad_(False)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        for m in self.model.modules():
            if isinstance(m, self.layer_types):
                m.enable_adapters(enabled)
            elif isinstance(m, ModulesToSaveWrapper):
                m.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; this model has {sorted(self.peft_config)}")
        for m in self.adapter_layers():
            if adapter_name in m.adapters:
                m.delete_adapter(adapter_name)
        for m in self.model.modules():
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
                del m.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]

    # --- merge and unload --------------------------------------------------------------------------
    def _replace_wrappers(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        if merge and not self.supports_merge:
            raise ValueError(f"{type(self).__name__} adapters cannot be merged into the base weights; use unload()")
        for name, m in list(self.model.named_modules()):
            if isinstance(m, self.layer_types):
                if merge:
                    m.merge(adapter_names)
                parent, child = get_parent(self.model, name)
                setattr(parent, child, m.base_layer)
            elif isinstance(m, ModulesToSaveWrapper):
                parent, child = get_parent(self.model, name)
                setattr(parent, child, m.modules_to_save[m.active_adapter] if m.active_adapter in m.modules_to_save
                        else m.original_module)
        return self.model

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Merges the active adapters into the base weights and returns the plain base model."""
        return self._replace_wrappers(True, adapter_names)

    def unload(self) -> nn.Module:
        """Removes every adapter layer without merging and returns the original base model."""
        return self._replace_wrappers(False)

    # --- adapter files -----------------------------------------------------------------------------
    def owns(self, key: str) -> bool:
        """Whether a parameter/state-dict name holds one of the method's prefixes."""
        prefixes = (self.prefix,) if isinstance(self.prefix, str) else self.prefix
        return any(p in key for p in prefixes)

    def is_adapter_key(self, key: str, adapter_name: str) -> bool:
        """Whether a state-dict key of the PeftModel holds a tensor of ``adapter_name``."""
        tag = f".{adapter_name}"
        return self.owns(key) and (f"{tag}." in key or key.endswith(tag))

    def extra_saved_keys(self, key: str, config) -> bool:
        """Keys saved besides the adapter's own tensors (LoRA's bias option)."""
        return False

    def to_file_tensors(self, tensors: dict, adapter_name: str) -> dict:
        """The adapter's tensors as written to its file (AdaLoRA keeps only the allocated ranks)."""
        return tensors

    def before_loading_tensors(self, adapter_name: str) -> None:
        """Called after a loaded adapter is injected and before its file's tensors are copied in
        (AdaLoRA shrinks its layers to the file's rank_pattern here)."""
        return None

    def file_key(self, key: str) -> str:
        """A saved key (adapter name removed) as the method's files spell it; the identity unless HF
        PEFT renames some tensors (LoRA's DoRA magnitude)."""
        return key

    def key_from_file(self, key: str) -> str:
        """Inverse of ``file_key``, applied to a file's keys before the adapter name is put back."""
        return key
