"""Module-tree helpers and ModulesToSaveWrapper (a fully trained copy of a module, per adapter)."""

from __future__ import annotations

import contextlib
import copy

from torch import nn


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@contextlib.contextmanager
def patch_prepare_inputs(model: nn.Module, prepare):
    """Runs ``prepare`` on what ``model.prepare_inputs_for_generation`` returns, for the duration
    (restoring an instance-level override if the model had one)."""
    had_own = "prepare_inputs_for_generation" in model.__dict__
    saved = model.__dict__.get("prepare_inputs_for_generation")
    original = model.prepare_inputs_for_generation

    def hooked(*args, **kwargs):
        return prepare(original(*args, **kwargs))
    model.prepare_inputs_for_generation = hooked
    try:
        yield
    finally:
        if had_own:
            model.prepare_inputs_for_generation = saved
        else:
            del model.prepare_inputs_for_generation


class ModulesToSaveWrapper(nn.Module):
    """Keeps ``original_module`` frozen and trains ``modules_to_save[adapter]``, a copy, as HF PEFT."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(True)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            self.active_adapter = adapter_name
            for name, m in self.modules_to_save.items():
                m.requires_grad_(name == adapter_name)

    def forward(self, *args, **kwargs):
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)
