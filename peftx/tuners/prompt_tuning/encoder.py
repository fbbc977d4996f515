"""PromptEmbedding: prompt tuning's table of virtual-token embeddings (Lester et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from peftx.tuners.prompt_learning.encoder import PromptEncoderBase


def text_init_ids(config, total: int) -> list[int]:
    """The token ids of prompt_tuning_init_text fitted to ``total`` virtual tokens: truncated when the
    text is longer, repeated (then truncated) when shorter, as HF PEFT does."""
    from transformers import AutoTokenizer
    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # loading an adapter must never run code from the tokenizer's repo
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer_name_or_path: could not load a tokenizer from "
                         f"{config.tokenizer_name_or_path!r}: {e}") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens")
    reps = -(-total // len(ids))
    return (ids * reps)[:total]


def _check_ids(ids: torch.Tensor, word_embeddings: nn.Module) -> None:
    vocab = word_embeddings.weight.shape[0]
    if int(ids.max()) >= vocab:
        raise ValueError(f"the init tokenizer produced token id {int(ids.max())} but the model's vocabulary has "
                         f"{vocab} entries: tokenizer_name_or_path names another model's tokenizer")


class PromptEmbedding(PromptEncoderBase):
    def __init__(self, config, word_embeddings: nn.Module | None):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        init = getattr(config.prompt_tuning_init, "value", config.prompt_tuning_init)
        if config.inference_mode or init not in ("TEXT", "SAMPLE_VOCAB"):
            return
        if word_embeddings is None:
            raise ValueError(f"prompt_tuning_init={init!r} needs the model's word embeddings, which were not found")
        if init == "TEXT":
            ids = torch.tensor(text_init_ids(config, total), dtype=torch.long)
        else:
            ids = torch.randint(0, word_embeddings.weight.shape[0], (total,), dtype=torch.long)
        _check_ids(ids, word_embeddings)
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())
