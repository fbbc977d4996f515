"""PromptEncoderConfig: P-tuning (Liu et al., 2021) with HF PEFT's fields and names."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peftx.config import PeftType
from peftx.tuners.prompt_learning.config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={
            "help": "MLP: three linear layers with ReLU over the virtual-token embeddings; LSTM: a bidirectional "
                    "LSTM over them followed by a two-layer MLP."})
    encoder_hidden_size: int | None = field(default=None, metadata={
        "help": "Hidden size of the reparameterization; None: token_dim."})
    encoder_num_layers: int = field(default=2, metadata={
        "help": "LSTM layers (the MLP always has HF PEFT's fixed depth; other values warn and are ignored)."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between LSTM layers, in [0, 1)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                self.encoder_reparameterization_type)
        except ValueError:
            raise ValueError("encoder_reparameterization_type must be 'MLP' or 'LSTM', got "
                             f"{self.encoder_reparameterization_type!r}") from None
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise ValueError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")

    def _fill_method_fields(self, model_cfg: dict) -> None:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim

    def build_encoder(self, word_embeddings):
        from peftx.tuners.p_tuning.encoder import PromptEncoder
        return PromptEncoder(self)
