"""What every prompt encoder provides to the PeftModel (peftx/prompt_model.py):

- ``prompts(batch_size, task_ids)``: the virtual tokens' values, [batch, tokens, width] (for prefix
  tuning width is num_layers * 2 * token_dim: the keys and values of every layer);
- ``saved_tensors()`` / ``load_saved(tensors)``: the tensors in HF PEFT's adapter file
  (``prompt_embeddings``, the encoder's output for every virtual token, plus method extras).

In inference mode an encoder with a reparameterization (P-tuning's MLP/LSTM, prefix tuning's
projection) keeps only its output table, as HF PEFT does: that table is what the file holds."""

from __future__ import annotations

import torch
from torch import nn


class PromptEncoderBase(nn.Module):
    embedding: nn.Embedding

    def encode(self, indices: torch.Tensor) -> torch.Tensor:
        """The encoder's output for virtual-token indices [n] -> [n, width]."""
        return self.embedding(indices)

    def table(self) -> torch.Tensor:
        """The output for every virtual token, [tokens, width] (what HF PEFT saves)."""
        idx = torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)
        return self.encode(idx)

    def prompts(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.table().unsqueeze(0).expand(batch_size, -1, -1)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        # computed as inference computes it (no autograd: the LSTM takes another kernel path with grad)
        with torch.no_grad():
            return {"prompt_embeddings": self.table()}

    def load_saved(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        if "prompt_embeddings" not in tensors:
            raise ValueError(f"adapter {source!r} has no 'prompt_embeddings' tensor (has {sorted(tensors)[:5]}): "
                             "it is not a prompt-learning adapter file")
        value = tensors["prompt_embeddings"]
        if tuple(value.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(f"adapter {source!r}: prompt_embeddings has shape {tuple(value.shape)} but this model "
                             f"expects {tuple(self.embedding.weight.shape)} (num_virtual_tokens x token width); the "
                             "adapter was trained for another model or configuration")
        with torch.no_grad():
            self.embedding.weight.copy_(value.to(self.embedding.weight.dtype))
