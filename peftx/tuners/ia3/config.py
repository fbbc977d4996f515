"""IA3Config: HF PEFT's (IA)^3 fields and names, so adapter_config.json files move both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftx.config import PeftConfig, PeftType


@dataclass
class IA3Config(PeftConfig):
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules to scale: exact names or name suffixes, a regex (full match) as one string, or "
                "'all-linear'. None: HF PEFT's (IA)^3 default for the model's architecture."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules never to adapt (same matching rules as target_modules)."})
    feedforward_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Targets whose INPUT is scaled (the feed-forward down projections of the paper); the other "
                "targets scale their output. Names match as HF PEFT does: a regex string with full match, or a "
                "list of strings the module name ends with. None: the architecture's default."})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "True if the target stores its weight as [in, out] (GPT-2 Conv1D); set automatically."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})
    init_ia3_weights: bool = field(default=True, metadata={
        "help": "True: vectors of ones (the output equals the base model's at init); False: random normal."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.IA3
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple)):
                setattr(self, name, sorted(v))
            elif v is not None and not isinstance(v, (list, str)):
                raise ValueError(f"{name} must be None, a list of names or a regex string, got {type(v).__name__}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be a bool, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; not targeted: {extra}")
