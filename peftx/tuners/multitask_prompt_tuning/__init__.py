"""Multitask prompt tuning: a shared prompt modulated per task by a rank-r product."""

from peftx.tuners.multitask_prompt_tuning.config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from peftx.tuners.multitask_prompt_tuning.encoder import MultitaskPromptEmbedding

__all__ = ["MultitaskPromptEmbedding", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"]
