"""Adapter files in HF PEFT's format: the adapter's state dict with the adapter name stripped from
the keys, written as adapter_model.safetensors (atomically: a crash mid-save leaves the previous
file), and read back without unpickling anything."""

from __future__ import annotations

import os
import re
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")
_LORA_MODULE = re.compile(r"\.(lora_A|lora_B)\.")
_LORA_PARAM = re.compile(r"\.(lora_embedding_A|lora_embedding_B)$")


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


def adapter_state_dict(model: torch.nn.Module, adapter_name: str, bias: str,
                       wrapper_prefixes: list[str]) -> dict[str, torch.Tensor]:
    """The tensors HF PEFT saves for one LoRA adapter of a PeftModel, keyed as in its files."""
    sd = model.state_dict()
    out = {}
    tag = f".{adapter_name}"
    for k, v in sd.items():
        is_lora = ("lora_" in k) and (f"{tag}." in k or k.endswith(tag))
        # bias='all' takes every '.bias' key, wrapper copies included, exactly as HF PEFT does.
        if is_lora or (bias == "all" and k.endswith(".bias")) or (bias == "lora_only" and k.endswith(".base_layer.bias")):
            out[k.replace(tag + ".", ".") if f"{tag}." in k else k.removesuffix(tag) if k.endswith(tag) else k] = v
    for prefix in wrapper_prefixes:
        inner = f"{prefix}.modules_to_save.{adapter_name}."
        for k, v in sd.items():
            if k.startswith(inner):
                out[prefix + "." + k[len(inner):]] = v
    return out


def to_model_key(key: str, adapter_name: str, wrapper_prefixes: list[str]) -> str:
    """Inverse of adapter_state_dict's key naming."""
    if _LORA_MODULE.search(key):
        return _LORA_MODULE.sub(lambda m: f".{m.group(1)}.{adapter_name}.", key, count=1)
    if _LORA_PARAM.search(key):
        return f"{key}.{adapter_name}"
    for prefix in wrapper_prefixes:
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1:]
            if rest.startswith("original_module."):
                return key
            rest = rest.removeprefix("modules_to_save.")
            return f"{prefix}.modules_to_save.{adapter_name}.{rest}"
    return key
