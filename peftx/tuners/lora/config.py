"""LoraConfig: HF PEFT's LoRA fields and names, so adapter_config.json files move both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftx.config import PeftConfig, PeftType


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
        "help": "True: A kaiming-uniform, B zero (output unchanged at init); 'gaussian'; False: both random."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only these layer indices (as found in module names such as 'layers.3.')."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."})
    rank_pattern: dict = field(default_factory=dict, metadata={
        "help": "Per-module rank overrides: {regex matched at the end of the module name: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={
        "help": "Per-module alpha overrides: {regex matched at the end of the module name: alpha}."})

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
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise ValueError(f"{name} must be a dict of regex -> value, got {type(pattern).__name__}")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
