"""AdamW and AdamW8bit: torch.optim.Optimizer subclasses whose step is one fused op call per device
and state format (peftx.ops.optim), however many tensors a group holds.

Semantics are torch.optim.AdamW's (decoupled weight decay, bias correction, ``maximize``; no
amsgrad), with the state in float32 whatever the parameter dtype (fp32, fp16 or bf16). AdamW8bit
keeps both moments in bitsandbytes' blockwise 8-bit format (2.03 bytes per parameter); parameters
with fewer than ``min_8bit_size`` elements keep float32 state, as bitsandbytes does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch

from peftx.ops.optim import adamw8bit_step, adamw_step
from peftx.optim.state import check_saved_state, fields, step_tensor

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_hyper(where: str, lr, betas, eps, weight_decay) -> None:
    lr = float(lr)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr}")
    if not (math.isfinite(float(eps)) and eps >= 0.0):
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps}")
    if len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas}")
    for name, b in zip(("beta1", "beta2"), betas):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"{where}: betas {name} must be in [0, 1), got {b}")
    if not (math.isfinite(float(weight_decay)) and weight_decay >= 0.0):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay}")


class _FusedAdamW(torch.optim.Optimizer):
    """The shared machinery; subclasses choose the state format (``_eight_bit``) and where state
    buffers live (``_alloc_state``) and how a group's update runs (``_update``)."""

    _eight_bit = False

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, maximize: bool = False,
                 min_8bit_size: int = 4096):
        name = type(self).__name__
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        _check_hyper(name, lr, betas, eps, weight_decay)
        if int(min_8bit_size) < 0:
            raise ValueError(f"{name}: min_8bit_size must be >= 0, got {min_8bit_size}")
        self.min_8bit_size = int(min_8bit_size)
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay), maximize=bool(maximize))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        _check_hyper(f"{name} param group {len(self.param_groups) - 1}", group["lr"], group["betas"], group["eps"],
                     group["weight_decay"])
        for p in group["params"]:
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"{name}: parameters must be float32, float16 or bfloat16, got {p.dtype}")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    # --- state ---------------------------------------------------------------------------------

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self._eight_bit and p.numel() >= self.min_8bit_size

    def _alloc_state(self, p: torch.Tensor, eight_bit: bool) -> dict[str, torch.Tensor]:
        """Zeroed state tensors of ``p`` (plain tensors on its device)."""
        return {f.name: torch.zeros(f.shape, dtype=f.dtype, device=p.device) for f in fields(p, eight_bit)}

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self._alloc_state(p, self._uses_8bit(p))
        state["step"] = step_tensor()
        return state

    def state_bytes(self) -> int:
        """Bytes of optimizer state held for the parameters (the moments; steps not counted)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for k, v in s.items()
                   if k != "step" and isinstance(v, torch.Tensor))

    # --- step ----------------------------------------------------------------------------------

    def _group_hyper(self, index: int, group: dict) -> dict:
        lr = float(group["lr"])
        _check_hyper(f"{type(self).__name__} param group {index}", lr, group["betas"], group["eps"],
                     group["weight_decay"])
        if group.get("amsgrad"):
            raise ValueError(f"{type(self).__name__} param group {index}: amsgrad is not supported")
        return dict(lr=lr, beta1=float(group["betas"][0]), beta2=float(group["betas"][1]), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), maximize=bool(group.get("maximize", False)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        # Everything is checked, and every missing state allocated, before any parameter changes:
        # a failure leaves the parameters and the existing state untouched.
        work = []
        for gi, group in enumerate(self.param_groups):
            hyper = self._group_hyper(gi, group)
            items = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{name}: sparse gradients are not supported")
                # (torch's .grad setter already ensures the shape and device match the parameter's)
                if g.dtype is not p.dtype:
                    raise RuntimeError(f"{name}: the gradient of a parameter {list(p.shape)} {p.dtype} is {g.dtype}")
                items.append(p)
            work.append((hyper, items))
        created = []
        try:
            for _, items in work:
                for p in items:
                    if not self.state[p]:
                        self.state[p] = self._init_state(p)
                        created.append(p)
        except BaseException:
            for p in created:
                del self.state[p]
            raise
        for hyper, items in work:
            if items:
                self._update(items, hyper)
        return loss

    def _update(self, params: list[torch.Tensor], hyper: dict) -> None:
        """One fused call per (device, state format)."""
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, "exp_avg_codes" in self.state[p])].append(p)
        for (_, eight_bit), ps in buckets.items():
            states = [self.state[p] for p in ps]
            steps = [s["step"] for s in states]  # counted by the op
            grads = [p.grad for p in ps]
            if eight_bit:
                adamw8bit_step(ps, grads, [s["exp_avg_codes"] for s in states], [s["exp_avg_absmax"] for s in states],
                               [s["exp_avg_sq_codes"] for s in states], [s["exp_avg_sq_absmax"] for s in states],
                               steps, increment_steps=True, **hyper)
            else:
                adamw_step(ps, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps,
                           increment_steps=True, **hyper)

    # --- load_state_dict -----------------------------------------------------------------------

    def _load_param_state(self, index: int, p: torch.Tensor, saved: dict) -> dict:
        """This optimizer's state of ``p`` holding the values of ``saved`` (already checked)."""
        state = self._alloc_state(p, self._uses_8bit(p))
        for k, dst in state.items():
            dst.copy_(saved[k].reshape(dst.shape))
        state["step"] = step_tensor(float(saved["step"]))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch.optim.Optimizer.load_state_dict, but state keeps its own dtypes (float32 moments
        and uint8 codes, never cast to the parameter dtype) and every saved state is checked against
        this optimizer's parameters first: a mismatch raises ValueError and changes nothing."""
        name = type(self).__name__
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state_dict has {len(saved_groups)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}")
        id_map = {}
        index = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: parameter group {gi} has {len(saved['params'])} parameters "
                                 f"in the state_dict and {len(group['params'])} here")
            for pid, p in zip(saved["params"], group["params"]):
                id_map[pid] = p
                index[pid] = len(index)
            if saved.get("amsgrad"):
                raise ValueError(f"{name}.load_state_dict: parameter group {gi} uses amsgrad, which is not supported")
        for pid, saved_state in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"{name}.load_state_dict: the state_dict has state for parameter id {pid}, which is "
                                 f"in none of its parameter groups")
            check_saved_state(name, index[pid], id_map[pid], self._uses_8bit(id_map[pid]), saved_state)
        state = defaultdict(dict)
        for pid, saved_state in state_dict["state"].items():
            p = id_map[pid]
            state[p] = self._load_param_state(index[pid], p, saved_state)
        groups = [{**saved, "params": group["params"]} for saved, group in zip(saved_groups, self.param_groups)]
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


class AdamW(_FusedAdamW):
    """torch.optim.AdamW semantics (no amsgrad) in one fused kernel call per device; float32 state.

    Args: params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, maximize: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, maximize=maximize)


class AdamW8bit(_FusedAdamW):
    """AdamW with both moments in bitsandbytes' blockwise 8-bit format (blocks of 256, dynamic maps).

    Args: as AdamW, plus min_8bit_size=4096: smaller parameters keep float32 state.
    """

    _eight_bit = True
