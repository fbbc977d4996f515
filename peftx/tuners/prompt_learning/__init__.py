"""Shared machinery of the prompt-learning methods (prompt tuning, P-tuning, prefix tuning, multitask
prompt tuning): their common config, and the PeftModel side lives in peftx/prompt_model.py."""

from peftx.tuners.prompt_learning.config import PromptLearningConfig

__all__ = ["PromptLearningConfig"]
