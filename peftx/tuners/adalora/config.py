"""AdaLoraConfig: HF PEFT's AdaLoRA fields and names (a LoraConfig plus the rank-allocation schedule),
so adapter_config.json files move both ways."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from peftx.config import PeftType
from peftx.tuners.lora.config import LoraConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA trains in three phases over ``total_step`` steps: ``tinit`` warm-up steps at the full
    budget (``init_r`` per module), a budget that falls on a cubic curve to ``target_r`` per module
    (on average) until step ``total_step - tfinal``, masking the least important singular values every
    ``deltaT`` steps, then ``tfinal`` steps with the final mask fixed. ``r`` is not used (``init_r``
    is the starting rank); ``rank_pattern`` holds the allocation (module -> kept singular values)."""

    target_r: int = field(default=8, metadata={"help": "Target average rank per module at the end."})
    init_r: int = field(default=12, metadata={"help": "Initial rank of every module."})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps before the budget starts to fall."})
    tfinal: int = field(default=0, metadata={"help": "Final steps with the allocation fixed."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity, in (0, 1)."})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of the uncertainty, in (0, 1)."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonality regulariser."})
    total_step: int | None = field(default=None, metadata={"help": "Total training steps (required)."})
    rank_pattern: dict | None = field(default=None, metadata={
        "help": "The allocation found by training: {'<module>.lora_E': [bool per singular value]}."})

    def __post_init__(self):
        pattern, self.rank_pattern = self.rank_pattern, {}
        super().__post_init__()  # LoraConfig's checks (its rank_pattern means ranks; ours means masks)
        self.rank_pattern = pattern
        self.peft_type = PeftType.ADALORA
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str (a regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: give both or neither")
        if self.r != 8:
            warnings.warn("r is not used by AdaLoRA and is ignored; the initial rank is init_r", stacklevel=3)
        if (not isinstance(self.total_step, int) or isinstance(self.total_step, bool) or self.total_step <= 0):
            raise ValueError(f"total_step must be a positive integer (AdaLoRA's schedule needs the number of "
                             f"training steps), got {self.total_step!r}")
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name in ("init_r", "deltaT") else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name in ('init_r', 'deltaT') else 0}, got {v!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): AdaLoRA only "
                             "removes rank; lower target_r or raise init_r")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"the schedule leaves no budgeting phase: tinit ({self.tinit}) must be < total_step "
                             f"({self.total_step}) - tfinal ({self.tfinal}); decrease tinit/tfinal or increase "
                             "total_step")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be None or a dict of module -> list of bools, "
                             f"got {type(self.rank_pattern).__name__}")
