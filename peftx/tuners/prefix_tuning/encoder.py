"""PrefixEncoder: the per-layer key/value prefix, [num_virtual_tokens, num_layers * 2 * token_dim]
(layer l's key then value, each num_heads x head_dim). With ``prefix_projection`` (training only) it
is ``transform(embedding)``: Linear(token_dim, hidden), tanh, Linear(hidden, num_layers*2*token_dim)."""

from __future__ import annotations

import torch
from torch import nn

from peftx.tuners.prompt_learning.encoder import PromptEncoderBase


class PrefixEncoder(PromptEncoderBase):
    def __init__(self, config):
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.projected = bool(config.prefix_projection) and not config.inference_mode
        if self.projected:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def encode(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        return self.transform(x) if self.projected else x

    def load_saved(self, tensors, source):
        if self.projected:
            raise ValueError(f"adapter {source!r}: a prefix-tuning file holds the projected keys/values, not the "
                             "projection MLP, so with prefix_projection=True it loads for inference only "
                             "(is_trainable=False)")
        super().load_saved(tensors, source)
