"""BitFitConfig (peftx only; HF PEFT has no BitFit, so its files load only in peftx): train only the
bias terms of the model (Ben Zaken et al., 2022), optionally only those of named modules."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftx.config import PeftConfig, PeftType


@dataclass
class BitFitConfig(PeftConfig):
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules whose bias trains: exact names or name suffixes, a regex (full match) as one string, "
                "or 'all-linear'. None: every module that has a bias."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules whose bias stays frozen (same matching rules as target_modules)."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.BITFIT
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple)):
                setattr(self, name, sorted(v))
            elif v is not None and not isinstance(v, (list, str)):
                raise ValueError(f"{name} must be None, a list of names or a regex string, got {type(v).__name__}")
