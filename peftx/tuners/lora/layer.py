"""LoRA layers that wrap (not copy) a frozen base layer: ``LoraLinear`` over ``nn.Linear`` or
transformers' GPT-2 ``Conv1D``, and ``LoraLinear4bit`` (QLoRA) over ``peftx.Linear4bit``.

The training forward of the first active adapter is one fused op (``peftx::lora_linear_fwd``: base
product + low-rank term, dropout mask regenerated in backward, see peftx/ops/lora.py). Parameters and
state-dict keys follow HF PEFT: ``base_layer.*``, ``lora_A.<adapter>.weight`` [r, in],
``lora_B.<adapter>.weight`` [out, r], and for DoRA adapters ``lora_magnitude_vector.<adapter>.weight``
[out] (see peftx/tuners/lora/dora.py)."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from peftx.ops import lora as lora_ops
from peftx.ops.nf4 import nf4_matmul_raw
from peftx.quant.linear4bit import Linear4bit
from peftx.quant.nf4_weight import NF4Weight
from peftx.tuners.lora import dora, inits
from peftx.tuners.lora.adapters import BASE_ADAPTER, AdapterSpec, check_new_name, check_spec
from peftx.tuners.tuner_layer import TunerLayer

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a runtime dependency
        return False
    return isinstance(module, Conv1D)


class LoraLayer(TunerLayer):
    adapter_containers = ("lora_A", "lora_B", "lora_magnitude_vector")
    """Named adapters over a frozen ``base_layer``; subclasses say how the base computes."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.adapters: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self._dora_merge_norms: dict[str, torch.Tensor] = {}  # norms of merged DoRA adapters, for unmerge
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # --- HF PEFT-style views of the hyper-parameters ------------------------------------------
    @property
    def r(self) -> dict[str, int]:
        return {k: v.r for k, v in self.adapters.items()}

    @property
    def lora_alpha(self) -> dict[str, float]:
        return {k: v.lora_alpha for k, v in self.adapters.items()}

    @property
    def scaling(self) -> dict[str, float]:
        return {k: v.scaling for k, v in self.adapters.items()}

    @property
    def use_dora(self) -> dict[str, bool]:
        return {k: v.use_dora for k, v in self.adapters.items()}

    # --- adapter management ---------------------------------------------------------------------
    def _adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        raise NotImplementedError

    def add_adapter(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True,
                    autocast_adapter_dtype: bool = True, *, use_dora: bool = False,
                    loftq_config: dict | inits.LoftQConfig | None = None) -> None:
        """Adds adapter ``adapter_name``; the first one added becomes active. ``init_lora_weights``:
        True, False, 'gaussian', or one that rewrites the base weight ('pissa', 'pissa_niter_<k>',
        'olora', 'loftq' with ``loftq_config``; see peftx/tuners/lora/inits.py). ``use_dora``: DoRA
        (peftx/tuners/lora/dora.py), its magnitude initialised after the adapter's weights."""
        check_new_name(self, adapter_name)
        spec = check_spec(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        if not inits.is_known_init(init_lora_weights):
            raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<k>', "
                             f"'olora' or 'loftq', got {init_lora_weights!r}")
        if inits.modifies_base(init_lora_weights) and r > min(self.in_features, self.out_features):
            raise ValueError(f"init_lora_weights={init_lora_weights!r}: r ({r}) must be at most min(in_features, "
                             f"out_features) ({min(self.in_features, self.out_features)}), the number of singular "
                             "directions of the base weight")
        if inits.modifies_base(init_lora_weights) and self.merged:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} rewrites the base weight, which holds merged "
                             "adapters; unmerge() first")
        device, dtype = self._adapter_device_dtype()
        if autocast_adapter_dtype and dtype in _LOW_PRECISION:
            dtype = torch.float32  # as HF PEFT: adapters train in fp32 by default
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
        elif init_lora_weights is not False:  # False: nn.Linear's own init, the output changes from the start
            A_init, B_init = self._init_from_base(init_lora_weights, r, spec.scaling, loftq_config)
            with torch.no_grad():
                A.weight.copy_(A_init)
                B.weight.copy_(B_init)
        self.lora_A[adapter_name] = A
        self.lora_B[adapter_name] = B
        self.adapters[adapter_name] = spec
        if use_dora:
            norm = self._dora_norm(adapter_name)
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(norm.to(dtype))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._sync_requires_grad()

    def _init_from_base(self, init: str, r: int, scaling: float, loftq_config) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a data-driven init; writes the residual into the base weight."""
        raise NotImplementedError

    def _dora_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row (fp32, detached) for the unmerged base weight W."""
        raise NotImplementedError

    # --- merging ---------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shaped like the base weight's ``[out, in]``."""
        A = self.lora_A[adapter_name].weight.float()
        B = self.lora_B[adapter_name].weight.float()
        return (B @ A) * self.adapters[adapter_name].scaling

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"adapter_names: unknown adapter {n!r}; this layer has {sorted(self.adapters)}")
            if n in self.merged_adapters:
                warnings.warn(f"adapter {n!r} is already merged; skipping it", stacklevel=2)
                continue
            self._merge_one(n, safe_merge)
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        raise NotImplementedError

    def _unmerge_one(self, name: str) -> None:
        raise NotImplementedError

    # --- forward ---------------------------------------------------------------------------------
    def _fused_forward(self, x: torch.Tensor, name: str, bias: bool = True,
                       dropout: bool = True) -> torch.Tensor:
        """``x W^T [+ b] + s D(x) A^T B^T`` in one op (D: the adapter's dropout in training, if asked)."""
        raise NotImplementedError

    def _dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The layer's output with DoRA adapter ``name`` (dora.py's formula); the base product and the
        low-rank term come from the fused op."""
        spec = self.adapters[name]
        factor = self.lora_magnitude_vector[name].weight / self._dora_norm(name)
        bias = self.bias
        p = spec.lora_dropout if self.training else 0.0
        if p == 0.0:
            z = self._fused_forward(x, name, bias=False, dropout=False)
            return dora.scale_rows(z, factor, bias.to(z.dtype) if bias is not None else None).to(x.dtype)
        # Dropout: the base term keeps x, the correction and the low-rank term see D(x) (as HF PEFT).
        xd = nn.functional.dropout(x, p, True)
        z = self._fused_forward(xd, name, bias=False, dropout=False)  # W xd + s B A xd
        y = dora.acc(self.base_layer(x)) + (dora.acc(factor) - 1) * dora.acc(z) + self._lora_term(xd, name, False)
        return y.to(x.dtype)

    def _dora_extra(self, x: torch.Tensor, name: str, y: torch.Tensor) -> torch.Tensor:
        """What DoRA adapter ``name`` adds to ``y``, the output so far (extra active adapters beyond the
        first): ``(f - 1) base + f s xd A^T B^T``, where, as in HF PEFT, ``base`` is ``y`` without the
        bias (earlier adapters' terms included) when there is no dropout, and ``xd W^T`` with dropout."""
        spec = self.adapters[name]
        factor = dora.acc(self.lora_magnitude_vector[name].weight / self._dora_norm(name))
        p = spec.lora_dropout if self.training else 0.0
        if p == 0.0:
            base = dora.acc(y) - (dora.acc(self.bias) if self.bias is not None else 0.0)
            return (factor - 1) * base + factor * dora.acc(self._lora_term(x, name, dropout=False))
        xd = nn.functional.dropout(x, p, True)
        z = self._fused_forward(xd, name, bias=False, dropout=False)
        return factor * dora.acc(z) - dora.acc(self._fused_base(xd))

    def _fused_base(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` without bias."""
        raise NotImplementedError

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        raise NotImplementedError

    def _lora_term(self, x: torch.Tensor, name: str, dropout: bool = True) -> torch.Tensor:
        """The unfused low-rank term (extra active adapters beyond the first)."""
        spec = self.adapters[name]
        cd = self._compute_dtype(x)
        xd = nn.functional.dropout(x.to(cd), spec.lora_dropout, self.training and dropout)
        A = self.lora_A[name].weight.to(cd)
        B = self.lora_B[name].weight.to(cd)
        return (xd @ A.t()) @ B.t() * spec.scaling

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError("adapter_names cannot be used while adapters are merged; unmerge() first")
            return self._mixed_forward(x, adapter_names)
        active = [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            y = self.base_layer(x, *args, **kwargs)
        else:
            first = active.pop(0)
            y = self._dora_forward(x, first) if self.adapters[first].use_dora else self._fused_forward(x, first)
        for n in active:
            extra = self._dora_extra(x, n, y) if self.adapters[n].use_dora else self._lora_term(x, n)
            y = y + extra.to(y.dtype)
        return y

    def _mixed_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Each sample (first dimension of x) uses its own adapter; ``"__base__"`` means none.
        Inference only, as in HF PEFT: no gradient flows to the adapters."""
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names must have one name per sample: {x.shape[0] if x.dim() >= 2 else 0} "
                             f"for x of shape {tuple(x.shape)}, got {len(adapter_names)}")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.adapters})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapters {unknown}; this layer has {sorted(self.adapters)}")
        used = sorted({n for n in adapter_names if n != BASE_ADAPTER})
        dora_used = [n for n in used if self.adapters[n].use_dora]
        if dora_used:
            raise ValueError(f"adapter_names (mixed batches) does not support DoRA adapters ({dora_used}): run "
                             "one forward per adapter with set_adapter(), or merge the DoRA adapter")
        if self.training and any(self.adapters[n].lora_dropout > 0 for n in used):
            raise ValueError("adapter_names (mixed batches) is for inference: call .eval() first (the mixed-batch "
                             "op applies no dropout)")
        base_out = self.base_layer(x)
        if not used:
            return base_out
        cd = self._compute_dtype(x)
        index = {n: i for i, n in enumerate(used)}
        rmax = max(self.adapters[n].r for n in used)
        # Mixed batches are inference: the stacked factors are copies outside autograd.
        with torch.no_grad():
            A = x.new_zeros((len(used), rmax, self.in_features), dtype=cd)
            B = x.new_zeros((len(used), self.out_features, rmax), dtype=cd)
            for n, i in index.items():
                r = self.adapters[n].r
                A[i, :r] = self.lora_A[n].weight.to(cd)
                B[i, :, :r] = self.lora_B[n].weight.to(cd)
        scalings = torch.tensor([self.adapters[n].scaling for n in used], dtype=torch.float32, device=x.device)
        per_sample = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=x.device)
        ids = per_sample.repeat_interleave(x[0].numel() // self.in_features)
        y = lora_ops.lora_multi_fwd(x.to(cd), base_out.to(cd), A, B, scalings, ids)
        return y.to(base_out.dtype)

    def extra_repr(self) -> str:
        return f"adapters={ {n: (s.r, s.lora_alpha) for n, s in self.adapters.items()} }, active={self.active_adapters}"


class LoraLinear(LoraLayer):
    """LoRA over a dense ``nn.Linear`` (or transformers' ``Conv1D``, whose weight is [in, out]).

    ``y = base(x) + scaling * dropout(x) A^T B^T`` with A [r, in] kaiming-uniform (a=sqrt(5)) and B [out, r]
    zero at init, so the output equals the base layer's. ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
    rsLoRA). Adapter weights are fp32 unless ``autocast_adapter_dtype=False`` (then the base dtype).
    """

    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, fan_in_fan_out: bool = False,
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True, use_dora: bool = False,
                 loftq_config: dict | inits.LoftQConfig | None = None):
        conv1d = _is_conv1d(base)
        if not (isinstance(base, nn.Linear) or conv1d) or isinstance(base, Linear4bit):
            raise TypeError(f"base must be a torch.nn.Linear or transformers Conv1D (use LoraLinear4bit for "
                            f"peftx.Linear4bit), got {type(base).__name__}")
        if conv1d and not fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True for a Conv1D base (its weight is [in, out])", stacklevel=2)
        elif isinstance(base, nn.Linear) and fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False for an nn.Linear base (its weight is [out, in])",
                          stacklevel=2)
        self.fan_in_fan_out = conv1d
        in_f, out_f = (base.weight.shape if conv1d else base.weight.shape[::-1])
        super().__init__(base, in_f, out_f)
        self.fan_in_fan_out = conv1d
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         autocast_adapter_dtype, use_dora=use_dora, loftq_config=loftq_config)

    def _adapter_device_dtype(self):
        w = self.base_layer.weight
        return w.device, w.dtype

    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def _set_weight_out_in(self, w_out_in: torch.Tensor) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            w.copy_((w_out_in.t() if self.fan_in_fan_out else w_out_in).to(w.dtype))

    def _compute_dtype(self, x):
        return self.base_layer.weight.dtype

    def _fused_forward(self, x, name, bias=True, dropout=True):
        spec = self.adapters[name]
        cd = self._compute_dtype(x)
        p = spec.lora_dropout if self.training and dropout else 0.0
        seed = lora_ops.draw_seed() if p > 0 else 0
        b = self.base_layer.bias if bias else None
        y, _ = lora_ops.lora_linear_fwd(x.to(cd), self._weight_out_in(), None, None, 64, b,
                                        self.lora_A[name].weight, self.lora_B[name].weight, spec.scaling, p, seed)
        return y

    def _fused_base(self, x):
        return nn.functional.linear(x.to(self._compute_dtype(x)), self._weight_out_in())

    def _init_from_base(self, init, r, scaling, loftq_config):
        w = self._weight_out_in().detach()
        if init == "loftq":
            # As HF PEFT on an unquantized layer: the base weight becomes dequant(Q); quantize the model
            # afterwards (peftx.quantize_model) to train on Q itself.
            _, iters = inits.check_loftq_config(loftq_config)
            A, B, q = inits.loftq(w, r, scaling, iters)
            self._set_weight_out_in(q.dequantize(torch.float32))
            return A, B
        A, B, residual = inits.olora(w, r, scaling) if init == "olora" else inits.pissa(w, r, scaling, init)
        self._set_weight_out_in(residual)
        return A, B

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight [out, in] in fp32 with every merged adapter taken out (a copy)."""
        w = self._weight_out_in().detach().float().clone()
        for n in reversed(self.merged_adapters):
            w = self._take_out(w, n, self._dora_merge_norms.get(n))
        return w

    def _take_out(self, w: torch.Tensor, name: str, norm: torch.Tensor | None) -> torch.Tensor:
        delta = self.get_delta_weight(name)
        if self.adapters[name].use_dora:
            factor = self.lora_magnitude_vector[name].weight.detach().float() / norm.float()
            return w / factor[:, None] - delta
        return w - delta

    def _dora_norm(self, name):
        w = self._unmerged_weight() if self.merged else self._weight_out_in()
        return dora.dense_row_norm(w, self.lora_A[name].weight, self.lora_B[name].weight,
                                   self.adapters[name].scaling)

    def _merge_one(self, name, safe_merge):
        current = self._weight_out_in().detach().float()
        delta = self.get_delta_weight(name)
        if self.adapters[name].use_dora:
            # The norm comes from the unmerged base, as the forward computes it (HF PEFT does the same).
            norm = self._dora_norm(name)
            factor = self.lora_magnitude_vector[name].weight.detach().float() / norm.float()
            merged = factor[:, None] * (current + delta)
        else:
            norm, merged = None, current + delta
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} produces NaN or inf in the base weight; it was not merged")
        if norm is not None:
            self._dora_merge_norms[name] = norm
        self._set_weight_out_in(merged)

    def _unmerge_one(self, name):
        norm = self._dora_merge_norms.pop(name, None)
        self._set_weight_out_in(self._take_out(self._weight_out_in().detach().float(), name, norm))


class LoraLinear4bit(LoraLayer):
    """QLoRA: LoRA over a frozen NF4 ``peftx.Linear4bit``. The forward and backward run the base
    product on the NF4 weight directly (``dx`` through the transposed NF4 product); merge dequantizes,
    adds, re-quantizes (``merge_errors`` records the error) and unmerge restores the original bytes."""

    def __init__(self, base: Linear4bit, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.05,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, use_dora: bool = False,
                 loftq_config: dict | inits.LoftQConfig | None = None, loftq_weight: torch.Tensor | None = None):
        """``loftq_weight``: the full-precision weight [out, in] that init_lora_weights='loftq' starts
        from (``from_linear`` passes it); the NF4 base is replaced by LoftQ's quantization of it."""
        if not isinstance(base, Linear4bit):
            raise TypeError(f"base must be a peftx.Linear4bit (see LoraLinear4bit.from_linear), got "
                            f"{type(base).__name__}")
        super().__init__(base, base.in_features, base.out_features)
        self._nf4_before_merge: list[NF4Weight] = []
        self.merge_errors: dict[str, float] = {}
        self._loftq_source = loftq_weight
        try:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                             autocast_adapter_dtype, use_dora=use_dora, loftq_config=loftq_config)
        finally:
            self._loftq_source = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.05,
                    blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                    **kwargs) -> "LoraLinear4bit":
        """The one-line QLoRA swap for an ``nn.Linear``: quantize it to NF4 and wrap it. With
        ``init_lora_weights='loftq'`` (and ``loftq_config``) the NF4 weight and the adapter come from
        LoftQ on ``linear``'s full-precision weight (peftx/tuners/lora/inits.py)."""
        base = Linear4bit.from_linear(linear, blocksize=blocksize, double_quant=double_quant,
                                      compute_dtype=compute_dtype)
        if kwargs.get("init_lora_weights") == "loftq":
            kwargs.setdefault("loftq_weight", linear.weight.detach())
        return cls(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)

    def _adapter_device_dtype(self):
        base = self.base_layer
        return base.weight.device, base.compute_dtype or base.weight.dtype

    def _compute_dtype(self, x):
        return self.base_layer.compute_dtype or x.dtype

    def _fused_forward(self, x, name, bias=True, dropout=True):
        spec = self.adapters[name]
        base = self.base_layer
        # Under autocast x and the bias go in as the autocast dtype (the op's own autocast policy),
        # cast here so that what backward sees is what the op computed with.
        device = x.device.type
        autocast = torch.is_autocast_enabled(device) and x.is_floating_point()
        cd = torch.get_autocast_dtype(device) if autocast else self._compute_dtype(x)
        p = spec.lora_dropout if self.training and dropout else 0.0
        seed = lora_ops.draw_seed() if p > 0 else 0
        b = base.bias.to(cd) if bias and base.bias is not None else None
        y = lora_ops.lora_linear_nf4(x.to(cd), base.weight, b, self.lora_A[name].weight, self.lora_B[name].weight,
                                     spec.scaling, p, seed)
        return y.to(x.dtype)

    def _fused_base(self, x):
        w = self.base_layer.weight
        cd = x.dtype if torch.is_autocast_enabled(x.device.type) else self._compute_dtype(x)
        return nf4_matmul_raw(x.to(cd), w.packed, w.absmax_fp32(), w.code, w.blocksize, w.out_features)

    def _unmerged_nf4(self) -> NF4Weight:
        return self._nf4_before_merge[0] if self._nf4_before_merge else self.base_layer.weight

    def _dora_norm(self, name):
        return dora.nf4_row_norm(self._unmerged_nf4(), self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.adapters[name].scaling)

    def _init_from_base(self, init, r, scaling, loftq_config):
        old = self.base_layer.weight
        if init == "loftq":
            _, iters = inits.check_loftq_config(loftq_config)
            if self._loftq_source is None:
                raise ValueError("init_lora_weights='loftq' needs the full-precision weight, which a peftx.Linear4bit "
                                 "no longer has: use LoraLinear4bit.from_linear(linear, init_lora_weights='loftq', "
                                 "loftq_config=...), or get_peft_model on the unquantized model (the base weights "
                                 "become the LoftQ-quantized values, as HF PEFT) and then peftx.quantize_model")
            A, B, q = inits.loftq(self._loftq_source, r, scaling, iters, old.blocksize, old.double_quant)
            self.base_layer.weight = q
            return A, B
        if init != "olora":
            raise TypeError(f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight, as in HF "
                            "PEFT: initialize PiSSA on the unquantized model, then quantize the residual model "
                            "(peftx.quantize_model)")
        # OLoRA over NF4, as HF PEFT: dequantize, decompose, re-quantize the residual.
        A, B, residual = inits.olora(old.dequantize(torch.float32), r, scaling)
        self.base_layer.weight = NF4Weight.quantize(residual.to(old.dtype), blocksize=old.blocksize,
                                                    double_quant=old.double_quant)
        return A, B

    def _merge_one(self, name, safe_merge):
        old = self.base_layer.weight
        target = old.dequantize(torch.float32) + self.get_delta_weight(name)
        if self.adapters[name].use_dora:
            factor = self.lora_magnitude_vector[name].weight.detach().float() / self._dora_norm(name)
            target = factor[:, None] * target
        if safe_merge and not torch.isfinite(target).all():
            raise ValueError(f"merging adapter {name!r} produces NaN or inf in the base weight; it was not merged")
        new = NF4Weight.quantize(target.to(old.dtype), blocksize=old.blocksize, double_quant=old.double_quant)
        err = (new.dequantize(torch.float32) - target).abs().max().item()
        self.merge_errors[name] = err
        logger.info("merged adapter %r into the NF4 base: re-quantization error max |dW| = %.3g", name, err)
        self._nf4_before_merge.append(old)
        self.base_layer.weight = new

    def _unmerge_one(self, name):
        # Exact: the NF4 bytes from before the merge come back, not a re-quantized subtraction.
        self.base_layer.weight = self._nf4_before_merge.pop()
        self.merge_errors.pop(name, None)
