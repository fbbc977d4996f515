"""LycorisConfig: the fields LoHa and LoKr share, with HF PEFT's names and defaults (their
adapter_config.json files move both ways)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peftx.config import PeftConfig


@dataclass
class LycorisConfig(PeftConfig):
    r: int = field(default=8, metadata={"help": "Rank of the low-rank factors."})
    alpha: float = field(default=8, metadata={"help": "Scaling numerator: scaling = alpha / r."})
    rank_dropout: float = field(default=0.0, metadata={
        "help": "Training only: probability of zeroing each output row of the weight update, in [0, 1)."})
    module_dropout: float = field(default=0.0, metadata={
        "help": "Training only: probability of skipping the adapter of a layer for a whole forward, in [0, 1)."})
    use_effective_conv2d: bool = field(default=False, metadata={
        "help": "Conv2d with kernel > 1x1: factor the kernel with a Tucker core (FedPara 'Proposition 3')."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules to adapt: exact names or name suffixes, a regex (full match) as one string, or "
                "'all-linear'. None: HF PEFT's default for the model's architecture."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules never to adapt (same matching rules as target_modules)."})
    init_weights: bool | str = field(default=True, metadata={
        "help": "True: one factor zero, so the output equals the base model's at init; False: all random."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only these layer indices (as found in module names such as 'layers.3.')."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."})
    rank_pattern: dict = field(default_factory=dict, metadata={
        "help": "Per-module rank overrides: {regex matched at the end of the module name: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={
        "help": "Per-module alpha overrides: {regex matched at the end of the module name: alpha}."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})

    _init_choices: ClassVar[tuple] = (True, False)  # LoKr adds 'lycoris'

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        for name in ("rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c)
                   for c in self._init_choices):
            raise ValueError(f"init_weights must be one of {list(self._init_choices)}, got {self.init_weights!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict of regex -> value, got {type(getattr(self, name)).__name__}")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the indices it selects)")
