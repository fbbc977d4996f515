"""Adapter files in HF PEFT's format: the adapter's state dict with the adapter name stripped from
the keys, written as adapter_model.safetensors (atomically: a crash mid-save leaves the previous
file), and read back without unpickling anything."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickles = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(directory, n))]
        hint = (f"; found {pickles[0]}, which peftx does not load (loading it would unpickle arbitrary code): "
                "convert it to safetensors") if pickles else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {os.fspath(directory)!r}{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _adapter_part(parts: list[str], prefix: str | tuple[str, ...]) -> int:
    """Index of the key component naming the adapter's module or parameter (the last one starting
    with the method's prefix, e.g. 'lora_A', 'hada_w1_a'), or -1."""
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith(prefix):
            return i
    return -1


def adapter_state_dict(model: torch.nn.Module, adapter_name: str, prefix: str | tuple[str, ...],
                       extra_key: Callable[[str], bool], wrapper_prefixes: list[str]) -> dict[str, torch.Tensor]:
    """The tensors HF PEFT saves for one adapter of a PeftModel, keyed as in its files: keys holding
    the method's ``prefix`` with the adapter-name component removed; keys for which ``extra_key``
    holds (LoRA's bias option) with the adapter name stripped; modules_to_save copies under their wrapper's name."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        i = _adapter_part(parts, prefix) if prefix else -1
        if i >= 0 and i + 1 < len(parts) and parts[i + 1] == adapter_name:
            out[".".join(parts[:i + 1] + parts[i + 2:])] = v
        elif i >= 0 and i > 0 and parts[-1] == adapter_name and i == len(parts) - 2:
            out[".".join(parts[:-1])] = v
        elif extra_key(k):
            out[k.replace(f".{adapter_name}.", ".")] = v  # HF PEFT strips the adapter name from every key
    for wp in wrapper_prefixes:
        inner = f"{wp}.modules_to_save.{adapter_name}."
        for k, v in sd.items():
            if k.startswith(inner):
                out[wp + "." + k[len(inner):]] = v
    return out


def to_model_key(key: str, adapter_name: str, prefix: str | tuple[str, ...],
                 wrapper_prefixes: list[str]) -> str:
    """Inverse of adapter_state_dict's key naming (HF PEFT's rule: the adapter name goes right after
    the component holding the prefix, or at the end when that component is the parameter)."""
    for wp in wrapper_prefixes:
        if key.startswith(wp + "."):
            rest = key[len(wp) + 1:]
            if rest.startswith("original_module."):
                return key
            rest = rest.removeprefix("modules_to_save.")
            return f"{wp}.modules_to_save.{adapter_name}.{rest}"
    parts = key.split(".")
    i = _adapter_part(parts, prefix) if prefix else -1
    if i < 0:
        return key
    return ".".join(parts[:i + 1] + [adapter_name] + parts[i + 1:])
