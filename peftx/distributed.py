"""Helpers for training peftx models under ``torch.distributed`` (DistributedDataParallel).

DDP checks that every rank's parameters have the same shapes, but not that the ranks built the same
adapters: two ranks with different ``lora_alpha``, dropout or target lists (but equal shapes), or
different NF4 quantization settings of the frozen base (not parameters, so never compared or
broadcast by DDP), would train silently apart. ``check_consistent`` compares a fingerprint of all of
that across ranks before training and raises the same clear error on every rank.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn

from peftx.quant.linear4bit import Linear4bit


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fingerprint(model: nn.Module) -> dict:
    """What must agree across ranks: each adapter's config, the active adapter, the trainable
    parameters (name, shape, dtype, in order) and the NF4 layers (name, shape, blocksize, double quant)."""
    model = _unwrap(model)
    configs = {}
    for name, config in sorted(getattr(model, "peft_config", {}).items()):
        d = config.to_dict()
        for k in ("base_model_name_or_path", "revision"):
            d.pop(k, None)
        configs[name] = d
    trainable = [[n, list(p.shape), str(p.dtype).removeprefix("torch.")]
                 for n, p in model.named_parameters() if p.requires_grad]
    nf4 = [[n, list(m.weight.shape), m.weight.blocksize, bool(m.weight.double_quant)]
           for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    return {"adapters": configs, "active_adapter": getattr(model, "active_adapter", None),
            "trainable": trainable, "nf4_layers": nf4}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            if isinstance(va, list) and isinstance(vb, list) and k in ("trainable", "nf4_layers"):
                only_a = [x for x in va if x not in vb][:2]
                only_b = [x for x in vb if x not in va][:2]
                out.append(f"{prefix}{k} ({len(va)} vs {len(vb)} entries; e.g. {only_a} vs {only_b})")
            else:
                out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


def check_consistent(model: nn.Module, group=None) -> str:
    """Raises ``ValueError`` on every rank unless all ranks of ``group`` built the same adapters (see
    ``fingerprint``); returns the shared fingerprint's SHA-256. Call it after ``get_peft_model`` and
    before wrapping the model in DDP (or with the DDP-wrapped model). A collective: every rank must call it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("check_consistent: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (torchrun sets the environment for it)")
    mine = fingerprint(model)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (_digest(mine), mine), group=group)
    reference_digest, reference = everyone[0]
    bad = [(rank, fp) for rank, (digest, fp) in enumerate(everyone) if digest != reference_digest]
    if bad:
        rank, fp = bad[0]
        diff = "; ".join(_differences(reference, fp)[:6])
        raise ValueError(f"peftx.distributed.check_consistent: the processes disagree on the adapter setup: rank "
                         f"{rank} differs from rank 0 ({diff}) [{len(bad)} of {len(everyone)} ranks differ]. Every "
                         "process must build the same model and LoraConfig (and quantize it the same way).")
    return reference_digest

