"""P-tuning: virtual-token embeddings produced by an MLP or LSTM reparameterization."""

from peftx.tuners.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftx.tuners.p_tuning.encoder import PromptEncoder

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
