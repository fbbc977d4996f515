"""Prefix keys/values as the model's own cache objects, and the forward arguments that go with them.

A prefix is a tensor [batch, num_virtual_tokens, num_layers * 2 * num_heads * head_dim] (for each
layer: its key, then its value). ``prefix_cache`` turns it into a transformers ``Cache`` already
holding ``num_virtual_tokens`` positions per layer (``DynamicCache``; ``EncoderDecoderCache`` for
encoder-decoder models, prefix in the decoder's self-attention, cross-attention recomputed), and
``prefix_forward_kwargs`` also extends the attention mask and shifts explicit position ids so the
real tokens sit after the prefix. Attention layers then attend over prefix + tokens and gradients
flow back into the prefix."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def _split_layers(prefix: torch.Tensor, num_layers: int, num_heads: int) -> list[torch.Tensor]:
    """[B, V, L*2*H*D] -> L tensors [2, B, H, V, D] (key, value)."""
    if prefix.dim() != 3:
        raise ValueError(f"prefix must be 3-D [batch, virtual tokens, num_layers*2*token_dim], got {tuple(prefix.shape)}")
    b, v, width = prefix.shape
    if width % (2 * num_layers * num_heads):
        raise ValueError(f"prefix width {width} is not num_layers ({num_layers}) x 2 x num_heads ({num_heads}) x head_dim")
    head_dim = width // (2 * num_layers * num_heads)
    kv = prefix.view(b, v, 2 * num_layers, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return list(kv.split(2))


def prefix_cache(model: nn.Module, prefix: torch.Tensor, num_layers: int, num_heads: int,
                 encoder_decoder: bool = False):
    """The Cache to pass as ``past_key_values``. For encoder-decoder models the decoder's layer i takes
    the stored pair (2i mod num_layers): HF PEFT's layout for those files, kept so adapters move both
    ways (the other pairs are unused)."""
    from transformers import DynamicCache, EncoderDecoderCache
    layers = _split_layers(prefix, num_layers, num_heads)
    config = getattr(model, "config", None)
    if encoder_decoder:
        pairs = [layers[(2 * i) % num_layers] for i in range(num_layers)]
        self_attn = DynamicCache([(kv[0], kv[1]) for kv in pairs])
        return EncoderDecoderCache(self_attn, DynamicCache())
    try:
        return DynamicCache([(kv[0], kv[1]) for kv in layers], config=config)
    except (AttributeError, TypeError, ValueError, KeyError):
        return DynamicCache([(kv[0], kv[1]) for kv in layers])


def extend_attention_mask(attention_mask: torch.Tensor | None, num_virtual_tokens: int) -> torch.Tensor | None:
    """[B, T] -> [B, V + T] with the virtual positions visible."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [batch, tokens] with prompt learning, got {tuple(attention_mask.shape)}")
    ones = attention_mask.new_ones(attention_mask.shape[0], num_virtual_tokens)
    return torch.cat((ones, attention_mask), dim=1)


def accepts_past_key_values(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters
    return "past_key_values" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def require_past_key_values(model: nn.Module, what: str = "prefix tuning") -> None:
    """ValueError naming `what` unless model's forward takes past_key_values (the prefix is a KV cache)."""
    if not accepts_past_key_values(model):
        raise ValueError(f"{what} needs a model whose forward takes past_key_values (a transformers model with a "
                         f"KV cache); {type(model).__name__}.forward does not")


def check_prefix_model(model: nn.Module, what: str = "prefix tuning") -> None:
    """When a prefix is added: the model takes past_key_values and gradient checkpointing is off."""
    require_past_key_values(model, what)
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError(f"{what} passes its prefix as a KV cache, which gradient checkpointing does not support: "
                         "disable gradient checkpointing (model.gradient_checkpointing_disable())")


def prefix_forward_kwargs(model: nn.Module, prefix: torch.Tensor, num_layers: int, num_heads: int,
                          kwargs: dict, encoder_decoder: bool = False) -> dict:
    """``kwargs`` for ``model(**kwargs)`` with the prefix in place: past_key_values set, the (decoder's,
    for encoder-decoder) attention mask extended by the prefix, explicit position ids shifted past it."""
    require_past_key_values(model)
    if kwargs.get("past_key_values") is not None:
        raise ValueError("past_key_values: prefix tuning supplies the cache itself; do not pass one")
    out = dict(kwargs)
    v = prefix.shape[1]
    out["past_key_values"] = prefix_cache(model, prefix, num_layers, num_heads, encoder_decoder)
    mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
    out[mask_key] = extend_attention_mask(out.get(mask_key), v)
    pos_key = "decoder_position_ids" if encoder_decoder else "position_ids"
    if out.get(pos_key) is not None:
        out[pos_key] = out[pos_key] + v
    return out
