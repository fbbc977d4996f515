"""BottleneckLayer: named bottleneck adapters on a sublayer's output projection, which it wraps (the
base module stays frozen and is called unchanged).

Per adapter: ``bottleneck_down.<name>`` Linear [hidden -> bottleneck], ``bottleneck_up.<name>`` Linear
[bottleneck -> hidden] (zero at init: weight and bias), and for gated adapters (UniPELT)
``bottleneck_gate.<name>`` Linear [hidden -> 1]. With base output ``h``:

    f(z)  = scaling * up(act(down(dropout(z))))       [* sigmoid(gate(z)) when gated]
    sequential:  h + f(h)
    parallel:    h + f(x), x = the input of the sublayer module (captured by a forward pre-hook)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from peftx.tuners.bottleneck.config import NON_LINEARITIES, check_adapter_args
from peftx.tuners.lora.adapters import check_new_name
from peftx.tuners.targets import _is_conv1d
from peftx.tuners.tuner_layer import TunerLayer

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}
assert set(_ACTIVATIONS) == set(NON_LINEARITIES)


@dataclass(frozen=True)
class BottleneckSpec:
    bottleneck: int
    non_linearity: str
    scaling: float
    dropout: float
    form: str
    gated: bool


def output_features(base: nn.Module) -> int:
    if _is_conv1d(base):
        return base.weight.shape[1]
    return base.out_features


def bottleneck_width(hidden: int, reduction_factor: float, bottleneck_size: int | None) -> int:
    if bottleneck_size is not None:
        return bottleneck_size
    width = int(hidden // reduction_factor)
    if width < 1:
        raise ValueError(f"reduction_factor {reduction_factor} leaves no bottleneck for hidden size {hidden} "
                         f"(hidden // reduction_factor = 0): use a reduction_factor of at most {hidden} or set "
                         "bottleneck_size")
    return width


class BottleneckLayer(TunerLayer):
    adapter_containers = ("bottleneck_down", "bottleneck_up", "bottleneck_gate")
    def __init__(self, base_layer: nn.Module, input_module: nn.Module | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.hidden = output_features(base_layer)
        self.adapters: dict[str, BottleneckSpec] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_gate = nn.ModuleDict()
        # Not submodules: the input module belongs to the base model (no second state-dict entry).
        self.__dict__["_input_module"] = input_module
        self.__dict__["_hook"] = None
        self.__dict__["_captured"] = None
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # --- adapters -----------------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.base_layer.weight
        dtype = getattr(self.base_layer, "compute_dtype", None) or w.dtype
        if dtype in _LOW_PRECISION or not dtype.is_floating_point:
            dtype = torch.float32  # adapters train in fp32, as LoRA's
        return w.device, dtype

    def add_adapter(self, adapter_name: str, reduction_factor: float = 16, bottleneck_size: int | None = None,
                    non_linearity: str = "relu", scaling: float = 1.0, adapter_dropout: float = 0.0,
                    form: str = "sequential", gated: bool = False) -> None:
        """Adds adapter ``adapter_name``; the first one added becomes active."""
        check_new_name(self, adapter_name)
        check_adapter_args(reduction_factor, bottleneck_size, non_linearity, scaling, adapter_dropout)
        if form not in ("sequential", "parallel"):
            raise ValueError(f"form must be 'sequential' or 'parallel', got {form!r}")
        if form == "parallel" and self._input_module is None:
            raise ValueError("form 'parallel' needs the sublayer's input module (input_module=)")
        width = bottleneck_width(self.hidden, reduction_factor, bottleneck_size)
        device, dtype = self._device_dtype()
        down = nn.Linear(self.hidden, width, device=device, dtype=dtype)
        up = nn.Linear(width, self.hidden, device=device, dtype=dtype)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        if gated:
            gate = nn.Linear(self.hidden, 1, device=device, dtype=dtype)
            nn.init.zeros_(gate.bias)
            self.bottleneck_gate[adapter_name] = gate
        self.adapters[adapter_name] = BottleneckSpec(width, non_linearity, float(scaling), float(adapter_dropout),
                                                     form, bool(gated))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._sync_hook()
        self._sync_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._sync_hook()

    # --- the parallel form's input ------------------------------------------------------------------
    def _sync_hook(self) -> None:
        """A forward pre-hook on the sublayer module while any adapter here is parallel."""
        wanted = any(s.form == "parallel" for s in self.adapters.values())
        if wanted and self._hook is None:
            self.__dict__["_hook"] = self._input_module.register_forward_pre_hook(self._capture, with_kwargs=True)
        elif not wanted and self._hook is not None:
            self.remove_hook()

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self.__dict__["_hook"] = None
        self.__dict__["_captured"] = None

    def _capture(self, _module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.__dict__["_captured"] = x if isinstance(x, torch.Tensor) else None

    def _take_input(self) -> torch.Tensor:
        x = self._captured
        self.__dict__["_captured"] = None
        if x is None:
            raise RuntimeError(f"parallel bottleneck adapter: the input of {type(self._input_module).__name__} was "
                               "not captured before this projection ran (the projection was called outside its "
                               "sublayer, or the sublayer received no tensor as its first argument/hidden_states)")
        if x.shape[-1] != self.hidden:
            raise RuntimeError(f"parallel bottleneck adapter: the sublayer input has width {x.shape[-1]} but the "
                               f"output projection has {self.hidden}; a parallel adapter needs equal widths")
        return x

    # --- forward ------------------------------------------------------------------------------------
    def adapter_output(self, z: torch.Tensor, name: str) -> torch.Tensor:
        spec = self.adapters[name]
        down, up = self.bottleneck_down[name], self.bottleneck_up[name]
        cd = down.weight.dtype
        zc = z.to(cd)
        a = _ACTIVATIONS[spec.non_linearity](F.linear(F.dropout(zc, spec.dropout, self.training), down.weight,
                                                      down.bias))
        out = F.linear(a, up.weight, up.bias) * spec.scaling
        if spec.gated:
            gate = self.bottleneck_gate[name]
            out = out * torch.sigmoid(F.linear(zc, gate.weight, gate.bias))
        return out.to(z.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.adapters] if not self.disable_adapters else []
        sub_input = self._take_input() if any(self.adapters[n].form == "parallel" for n in active) else None
        self.__dict__["_captured"] = None
        for n in active:
            src = h if self.adapters[n].form == "sequential" else sub_input
            h = h + self.adapter_output(src, n).to(h.dtype)
        return h

    def extra_repr(self) -> str:
        return (f"adapters={ {n: (s.bottleneck, s.form, s.non_linearity) for n, s in self.adapters.items()} }, "
                f"active={self.active_adapters}")
