"""Prompt tuning: trained virtual-token embeddings prepended to the input embeddings."""

from peftx.tuners.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftx.tuners.prompt_tuning.encoder import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
