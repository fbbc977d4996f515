"""PromptEncoder: P-tuning's reparameterized virtual tokens. Training computes
``mlp_head(embedding)`` (MLP) or ``mlp_head(lstm_head(embedding))`` (LSTM, the virtual tokens as one
sequence); the adapter file holds that output, and in inference mode the encoder is only the table
of it (``embedding``), as in HF PEFT."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftx.tuners.prompt_learning.encoder import PromptEncoderBase


class PromptEncoder(PromptEncoderBase):
    def __init__(self, config):
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = getattr(config.encoder_reparameterization_type, "value",
                                    config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, dim)
        self.reparameterized = not config.inference_mode
        if not self.reparameterized:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("P-tuning with the MLP reparameterization ignores encoder_num_layers "
                              f"({config.encoder_num_layers}); the MLP always has 3 linear layers", stacklevel=3)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def encode(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        if not self.reparameterized:
            return x
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(x)

    def load_saved(self, tensors, source):
        if self.reparameterized:
            raise ValueError(f"adapter {source!r}: a P-tuning file holds the encoder's output, not its MLP/LSTM "
                             "weights, so it loads for inference only (is_trainable=False), as in HF PEFT")
        super().load_saved(tensors, source)
