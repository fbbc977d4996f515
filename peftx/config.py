"""Configs shared by every PEFT method: ``TaskType`` and ``PeftConfig`` (the fields HF PEFT writes to
``adapter_config.json`` for any method), with JSON (de)serialization that tolerates unknown keys."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Method names as HF PEFT writes them to adapter_config.json (the peftx-only methods have names
    HF PEFT does not use)."""
    LORA = "LORA"
    ADALORA = "ADALORA"
    LOHA = "LOHA"
    LOKR = "LOKR"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    BITFIT = "BITFIT"            # peftx only
    BOTTLENECK = "BOTTLENECK"    # peftx only: bottleneck adapters (Houlsby / Pfeiffer)
    MAM = "MAM"                  # peftx only: prefix tuning + parallel adapter
    UNIPELT = "UNIPELT"          # peftx only: gated LoRA + prefix + adapter


@dataclass
class PeftConfig:
    """Fields common to every method."""

    task_type: TaskType | str | None = field(default=None, metadata={"help": "The kind of model head: a TaskType."})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze the adapter (load for inference)."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "The base model the adapter is for."})
    revision: str | None = field(default=None, metadata={"help": "The base model's revision."})
    peft_type: PeftType | str | None = field(default=None, metadata={"help": "The method; set by each config."})

    @property
    def is_prompt_learning(self) -> bool:
        """Prompt methods (prompt/prefix/P-tuning) add virtual tokens instead of wrapping modules."""
        return False

    def __post_init__(self):
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(f"task_type must be one of {[t.value for t in TaskType]}, got {self.task_type!r}") \
                    from None

    # --- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, set):
                v = sorted(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Builds the config; keys this version does not know are dropped with a warning (files from
        newer HF PEFT versions carry fields for features peftx does not have)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring keys this version does not know: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from peftx.save_load import write_atomic
        write_atomic(os.path.join(directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())

    @staticmethod
    def read_dict(directory: str | os.PathLike) -> dict[str, Any]:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}: not an adapter directory")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the adapter config is corrupt") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return data
