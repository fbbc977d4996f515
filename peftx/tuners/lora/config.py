"""LoraConfig: HF PEFT's LoRA fields and names, so adapter_config.json files move both ways."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from peftx.config import PeftConfig, PeftType
from peftx.tuners.lora.inits import LoftQConfig, is_known_init


@dataclass
class LoraConfig(PeftConfig):
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules to adapt: exact names or name suffixes, a regex (full match) as one string, or "
                "'all-linear'. None: HF PEFT's default for the model's architecture."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules never to adapt (same matching rules as target_modules)."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "True if the target stores its weight as [in, out] (GPT-2 Conv1D); set automatically."})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'lora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scaling = lora_alpha / sqrt(r)."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})
    init_lora_weights: bool | str = field(default=True, metadata={
        "help": "True: A kaiming-uniform, B zero (output unchanged at init); 'gaussian'; False: both random; "
                "'pissa' / 'pissa_niter_<k>' (principal singular vectors, residual written into the base "
                "weight), 'olora' (QR), 'loftq' (with loftq_config; see peftx/tuners/lora/inits.py)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only these layer indices (as found in module names such as 'layers.3.')."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."})
    rank_pattern: dict = field(default_factory=dict, metadata={
        "help": "Per-module rank overrides: {regex matched at the end of the module name: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={
        "help": "Per-module alpha overrides: {regex matched at the end of the module name: alpha}."})
    loftq_config: LoftQConfig | dict = field(default_factory=dict, metadata={
        "help": "LoftQ settings ({'loftq_bits': 4, 'loftq_iter': 1}) for init_lora_weights='loftq'."})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: a trained magnitude per output feature over the normalised W + scaling * B A "
                "(nn.Linear, Conv1D and peftx.Linear4bit targets)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not is_known_init(self.init_lora_weights):
            raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora' "
                             f"or 'loftq', got {self.init_lora_weights!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}")
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = vars(self.loftq_config)  # as HF PEFT: a plain dict in adapter_config.json
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ValueError("loftq_config must be given when init_lora_weights is 'loftq', e.g. "
                             "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)")
        if self.init_lora_weights != "loftq" and self.loftq_config:
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'", stacklevel=2)
            self.loftq_config = {}
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise ValueError(f"{name} must be a dict of regex -> value, got {type(pattern).__name__}")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
