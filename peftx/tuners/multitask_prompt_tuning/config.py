"""MultitaskPromptTuningConfig: multitask prompt tuning (Wang et al., 2023) with HF PEFT's fields and names."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peftx.config import PeftType
from peftx.tuners.prompt_tuning.config import PromptTuningConfig


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    prompt_tuning_init: MultitaskPromptTuningInit | str = field(default=MultitaskPromptTuningInit.RANDOM, metadata={
        "help": "RANDOM or TEXT (as prompt tuning) for the shared prompt; from a source-trained adapter file: "
                "AVERAGE_SOURCE_TASKS (shared prompt + the mean of the task factors), EXACT_SOURCE_TASK (shared "
                "prompt + the factors of task prompt_tuning_init_task), ONLY_SOURCE_SHARED (shared prompt only)."})
    prompt_tuning_init_state_dict_path: str | None = field(default=None, metadata={
        "help": "The source adapter's adapter_model.safetensors (safetensors only: nothing is unpickled)."})
    prompt_tuning_init_task: int | None = field(default=0, metadata={"help": "Source task for EXACT_SOURCE_TASK."})
    num_ranks: int | None = field(default=1, metadata={"help": "Rank of each task's prompt modulation."})
    num_tasks: int | None = field(default=1, metadata={"help": "Number of tasks (task_ids range over 0..num_tasks-1)."})

    _init_enum = MultitaskPromptTuningInit

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_ranks", "num_tasks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        # the source file is checked when read (at training init): a saved config still names it, and
        # loading the adapter for inference must not need it

    def _peft_type(self):
        return PeftType.MULTITASK_PROMPT_TUNING

    def build_encoder(self, word_embeddings):
        from peftx.tuners.multitask_prompt_tuning.encoder import MultitaskPromptEmbedding
        return MultitaskPromptEmbedding(self, word_embeddings)
