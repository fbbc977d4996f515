"""Prefix tuning: trained keys/values prepended in every attention layer through the model's own
KV cache objects.

Reusable mechanism (for methods built on it, e.g. MAM and UniPELT), in ``cache.py``:

- ``prefix_cache(model, prefix, num_layers, num_heads, encoder_decoder=False) -> Cache``: ``prefix``
  is [batch, num_virtual_tokens, num_layers * 2 * num_heads * head_dim] (per layer: key then value);
  returns a ``DynamicCache`` (built with the model's config, so its layer types follow the model) or,
  for encoder-decoder models, an ``EncoderDecoderCache`` with the prefix in the decoder's
  self-attention and an empty cross-attention cache.
- ``prefix_forward_kwargs(model, prefix, num_layers, num_heads, kwargs, encoder_decoder=False) ->
  dict``: ``kwargs`` for ``model(**kwargs)`` with ``past_key_values`` set, the attention mask
  extended by ones for the virtual tokens, and explicit position ids shifted by num_virtual_tokens.
  Raises ValueError for a model whose forward takes no past_key_values.
- ``extend_attention_mask(mask, num_virtual_tokens)``, ``accepts_past_key_values(model)``.

``PrefixEncoder(config).prompts(batch_size)`` gives the prefix tensor for a PrefixTuningConfig
whose dimensions were filled from the model (``config.fill_from_model(model)``: num_layers,
token_dim = num_heads * head_dim, using num_key_value_heads on GQA models).
"""

from peftx.tuners.prefix_tuning.cache import (accepts_past_key_values, extend_attention_mask, prefix_cache,
                                              prefix_forward_kwargs)
from peftx.tuners.prefix_tuning.config import PrefixTuningConfig
from peftx.tuners.prefix_tuning.encoder import PrefixEncoder

__all__ = ["PrefixEncoder", "PrefixTuningConfig", "accepts_past_key_values", "extend_attention_mask",
           "prefix_cache", "prefix_forward_kwargs"]
