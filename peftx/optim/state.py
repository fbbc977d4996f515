"""Optimizer-state layout of the fused AdamW family and the checks of ``load_state_dict``.

fp32 state (AdamW, PagedAdamW, and 8-bit optimizers for parameters below ``min_8bit_size``):
  step: CPU float32 scalar (torch.optim's convention); exp_avg, exp_avg_sq: float32, the parameter's shape.
8-bit state (AdamW8bit, PagedAdamW8bit): bitsandbytes' blockwise 8-bit Adam format:
  exp_avg_codes / exp_avg_sq_codes: uint8, the parameter's shape (signed / unsigned dynamic map);
  exp_avg_absmax / exp_avg_sq_absmax: float32 [ceil(numel / 256)].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftx.ops.optim import quant_blocks

FP32_KEYS = ("exp_avg", "exp_avg_sq")
INT8_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def fields(param: torch.Tensor, eight_bit: bool) -> list[Field]:
    """The state tensors of ``param`` (besides ``step``), in storage order."""
    shape = tuple(param.shape)
    if not eight_bit:
        return [Field("exp_avg", shape, torch.float32), Field("exp_avg_sq", shape, torch.float32)]
    blocks = (quant_blocks(param.numel()),)
    return [Field("exp_avg_codes", shape, torch.uint8), Field("exp_avg_sq_codes", shape, torch.uint8),
            Field("exp_avg_absmax", blocks, torch.float32), Field("exp_avg_sq_absmax", blocks, torch.float32)]


def step_tensor(value: float = 0.0) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def check_saved_state(owner: str, index: int, param: torch.Tensor, eight_bit: bool, saved: dict) -> None:
    """Raise ValueError naming the problem when ``saved`` is not this optimizer's state of ``param``."""
    expected = [f.name for f in fields(param, eight_bit)]
    keys = set(saved) - {"step"}
    where = f"{owner}.load_state_dict: parameter {index} (shape {list(param.shape)})"
    if "step" not in saved:
        raise ValueError(f"{where}: the saved state has no 'step'")
    if keys != set(expected):
        other = INT8_KEYS if not eight_bit else FP32_KEYS
        hint = ""
        if keys == set(other):
            hint = (" — it was saved by an 8-bit optimizer (AdamW8bit / PagedAdamW8bit)" if not eight_bit else
                    " — it was saved by a 32-bit optimizer (AdamW / PagedAdamW / torch.optim.AdamW), or with another "
                    "min_8bit_size")
        elif "max_exp_avg_sq" in keys:
            hint = " — amsgrad state is not supported"
        raise ValueError(f"{where}: the saved state has keys {sorted(keys)}, expected {sorted(expected)}{hint}")
    for f in fields(param, eight_bit):
        value = saved[f.name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: saved '{f.name}' is a {type(value).__name__}, expected a tensor")
        if value.numel() != f.numel:
            raise ValueError(f"{where}: saved '{f.name}' has {value.numel()} elements, expected {f.numel}; the "
                             f"state_dict belongs to a different parameter list")
        if f.dtype == torch.uint8 and value.dtype != torch.uint8:
            raise ValueError(f"{where}: saved '{f.name}' must be uint8 codes, got {value.dtype}")
        if f.dtype == torch.float32 and not value.is_floating_point():
            raise ValueError(f"{where}: saved '{f.name}' must be floating point, got {value.dtype}")
