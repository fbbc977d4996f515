"""``AdaLoraLinear``: LoRA in SVD form over a frozen ``nn.Linear`` or GPT-2 ``Conv1D``.

Per adapter, as HF PEFT (same parameter names and shapes): ``lora_A`` = P^T [r, in] (right singular
vectors), ``lora_E`` = Lambda [r, 1] (singular values, zero at init so the output equals the base),
``lora_B`` = Q [out, r] (left singular vectors), and ``ranknum`` [1] (the initial rank, frozen, not
saved). The output is

    y = base(x) + dropout(x) (A * E)^T B^T * lora_alpha / (ranknum + 1e-5)

computed by the fused ``peftx::lora_linear_fwd`` with A' = A * E (autograd reaches A and E through the
product). The RankAllocator (rank_allocator.py) masks singular values by zeroing entries of E; a
loaded allocation (rank_pattern) shrinks the tensors to the kept rows (``resize``), keeping ranknum so
the scale does not change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftx.ops import lora as lora_ops
from peftx.tuners.lora.adapters import check_new_name
from peftx.tuners.lora.layer import LoraLinear


@dataclass
class AdaLoraSpec:
    r: int              # current rank (rows of lora_A)
    lora_alpha: float
    lora_dropout: float
    ranknum: float      # the rank the adapter was created with; the scale divides by it
    use_dora: bool = False  # AdaLoRA has no DoRA form (LoraLayer's forward asks)

    @property
    def scaling(self) -> float:
        """HF PEFT's ``scaling[adapter]`` for AdaLoRA: lora_alpha (r when lora_alpha is 0)."""
        return self.lora_alpha if self.lora_alpha > 0 else float(self.r)

    @property
    def effective_scale(self) -> float:
        # (ranknum + 1e-5) rounded to fp32, as HF PEFT's fp32 ranknum parameter computes it.
        return self.scaling / float(torch.tensor(self.ranknum, dtype=torch.float32) + 1e-5)


class AdaLoraLinear(LoraLinear):
    """SVD-form adapters; see the module docstring. ``r`` is the initial rank (``init_r``)."""
    adapter_containers = ("lora_A", "lora_E", "lora_B")

    def __init__(self, base: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init_lora_weights: bool | str = True, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        from peftx.tuners.lora.layer import _is_conv1d
        super().__init__(base, r, lora_alpha, lora_dropout, False, init_lora_weights,
                         fan_in_fan_out=_is_conv1d(base), adapter_name=adapter_name,
                         autocast_adapter_dtype=autocast_adapter_dtype)

    def _ensure_svd_dicts(self) -> None:
        # LoraLayer made ModuleDicts of nn.Linear; AdaLoRA's factors are plain parameters, as HF PEFT.
        if not isinstance(self.lora_A, nn.ParameterDict):
            self.lora_A = nn.ParameterDict()
            self.lora_B = nn.ParameterDict()
            self.lora_E = nn.ParameterDict()
            self.ranknum = nn.ParameterDict()

    def add_adapter(self, adapter_name: str, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True,
                    autocast_adapter_dtype: bool = True, *, use_dora: bool = False,
                    loftq_config=None) -> None:
        if use_dora or loftq_config is not None or init_lora_weights not in (True, False):
            raise ValueError("AdaLoRA adapters take neither use_dora, loftq_config nor a base-rewriting "
                             f"init_lora_weights (got use_dora={use_dora}, init_lora_weights={init_lora_weights!r}); "
                             "use LoraConfig for DoRA / PiSSA / OLoRA / LoftQ")
        self._ensure_svd_dicts()
        check_new_name(self, adapter_name)
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"r must be an integer >= 0, got {r!r}")
        if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or lora_alpha < 0:
            raise ValueError(f"lora_alpha must be a number >= 0, got {lora_alpha!r}")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        device, dtype = self._adapter_device_dtype()
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        kw = dict(device=device, dtype=dtype)
        A, E, B = torch.randn(r, self.in_features, **kw), torch.randn(r, 1, **kw), torch.randn(self.out_features, r, **kw)
        if init_lora_weights:
            nn.init.zeros_(E)
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        self.lora_A[adapter_name] = nn.Parameter(A)
        self.lora_E[adapter_name] = nn.Parameter(E)
        self.lora_B[adapter_name] = nn.Parameter(B)
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(r), device=device), requires_grad=False)
        self.adapters[adapter_name] = AdaLoraSpec(r, float(lora_alpha), float(lora_dropout), float(r))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._sync_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.ranknum[adapter_name]  # a frozen buffer-like parameter, not a trained container

    def resize(self, adapter_name: str, keep: torch.Tensor | list[bool]) -> None:
        """Keeps only the singular triplets where ``keep`` is true (a loaded rank_pattern); ranknum,
        hence the scale, is unchanged."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_A[adapter_name].device).view(-1)
        spec = self.adapters[adapter_name]
        if keep.numel() != spec.r:
            raise ValueError(f"rank_pattern entry for this module has {keep.numel()} values but adapter "
                             f"{adapter_name!r} has rank {spec.r}")
        with torch.no_grad():
            for d, rows in ((self.lora_A, True), (self.lora_E, True), (self.lora_B, False)):
                old = d[adapter_name]
                d[adapter_name] = nn.Parameter(old[keep].clone() if rows else old[:, keep].clone(),
                                               requires_grad=old.requires_grad)
        self.adapters[adapter_name] = AdaLoraSpec(int(keep.sum()), spec.lora_alpha, spec.lora_dropout, spec.ranknum)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B (A * E) * scale`` in fp32, shaped like ``[out, in]``."""
        A = self.lora_A[adapter_name].float() * self.lora_E[adapter_name].float()
        return (self.lora_B[adapter_name].float() @ A) * self.adapters[adapter_name].effective_scale

    def _fused_forward(self, x, name):
        spec = self.adapters[name]
        cd = self._compute_dtype(x)
        if spec.r == 0:
            return self.base_layer(x.to(cd))
        p = spec.lora_dropout if self.training else 0.0
        seed = lora_ops.draw_seed() if p > 0 else 0
        y, _ = lora_ops.lora_linear_fwd(x.to(cd), self._weight_out_in(), None, None, 64, self.base_layer.bias,
                                        self.lora_A[name] * self.lora_E[name], self.lora_B[name],
                                        spec.effective_scale, p, seed)
        return y

    def _lora_term(self, x, name):
        spec = self.adapters[name]
        cd = self._compute_dtype(x)
        xd = nn.functional.dropout(x.to(cd), spec.lora_dropout, self.training)
        A = (self.lora_A[name] * self.lora_E[name]).to(cd)
        return (xd @ A.t()) @ self.lora_B[name].to(cd).t() * spec.effective_scale

    def _mixed_forward(self, x, adapter_names):
        raise ValueError("adapter_names (mixed-adapter batches) is not supported for AdaLoRA, as in HF PEFT; "
                         "use set_adapter()")

    def extra_repr(self) -> str:
        return f"adapters={ {n: (s.r, s.lora_alpha) for n, s in self.adapters.items()} }, active={self.active_adapters}"
