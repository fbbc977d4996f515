"""The prefix part of methods that compose an injected tuner with prefix tuning (MAM, UniPELT): one
adapter name owns both a tuner part (``base_model``, a BaseTuner that wraps modules) and a prefix part
(``prefix_part[<adapter>]``, keys/values prepended in every attention layer through the model's KV
cache, peftx/tuners/prefix_tuning/cache.py).

A composed config has ``prefix_config()`` (a PrefixTuningConfig) and ``prefix_gated`` (UniPELT's
gate). The gated prefix multiplies layer l's prefix keys and values by
``g_l = sigmoid(W x_bar + b)_l``, ``x_bar`` the attention-mask-weighted mean of the input-token
embeddings (the encoder's input for encoder-decoder models): one gate per layer and example. For
decoder-only models that mean covers the whole input sequence, so a token's prefix weight depends on
later tokens of the same input (a sentence-level gate, UniPELT's classification setting), and
``generate`` computes it once from the prompt.

Files: the tuner part's keys, plus ``prompt_embeddings`` (the prefix table, [virtual tokens,
num_layers * 2 * token_dim], as prefix tuning saves it) and for a gated prefix ``prefix_gate.weight``
[num_layers, hidden], ``prefix_gate.bias`` [num_layers]."""

from __future__ import annotations

import os

import torch
from torch import nn

from peftx.tuners.prefix_tuning.cache import (check_prefix_model, extend_attention_mask, prefix_cache,
                                              prefix_forward_kwargs)
from peftx.tuners.prefix_tuning.encoder import PrefixEncoder
from peftx.utils_modules import patch_prepare_inputs

PREFIX_KEYS = ("prompt_embeddings", "prefix_gate.weight", "prefix_gate.bias")


def is_composed(config) -> bool:
    return callable(getattr(config, "prefix_config", None))


class PrefixPart(nn.Module):
    def __init__(self, config, hidden: int | None, gated: bool):
        super().__init__()
        self.encoder = PrefixEncoder(config)
        self.num_layers, self.num_heads = config.num_layers, config.num_attention_heads
        if gated:
            if hidden is None:
                raise ValueError("a gated prefix reads the input embeddings: the model needs get_input_embeddings()")
            self.gate = nn.Linear(hidden, config.num_layers)
            nn.init.zeros_(self.gate.bias)

    def prefix(self, batch: int, gate_input: torch.Tensor | None) -> torch.Tensor:
        p = self.encoder.prompts(batch)
        if not hasattr(self, "gate"):
            return p
        g = torch.sigmoid(self.gate(gate_input.to(self.gate.weight.dtype)))  # [batch, layers]
        b, v, _ = p.shape
        return (p.view(b, v, self.num_layers, -1) * g[:, None, :, None].to(p.dtype)).view(b, v, -1)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.encoder.saved_tensors())
        if hasattr(self, "gate"):
            out.update({"prefix_gate.weight": self.gate.weight.detach(), "prefix_gate.bias": self.gate.bias.detach()})
        return out

    def load_saved(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.encoder.load_saved(tensors, source)
        if hasattr(self, "gate"):
            for name in ("weight", "bias"):
                key, own = f"prefix_gate.{name}", getattr(self.gate, name)
                if key not in tensors:
                    raise ValueError(f"adapter {source!r} lacks {key!r}: it was saved without the prefix gate")
                if tuple(tensors[key].shape) != tuple(own.shape):
                    raise ValueError(f"adapter {source!r}: {key} has shape {tuple(tensors[key].shape)}, this model "
                                     f"expects {tuple(own.shape)}")
                with torch.no_grad():
                    own.copy_(tensors[key].to(own.dtype))


class ComposedPrefixMixin:
    """What PeftModel does for the prefix part of a composed method (its tuner part is ``base_model``)."""

    def _add_prefix_part(self, adapter_name: str, config) -> None:
        model = self.base_model.model
        if "prefix_part" not in self._modules:
            self.prefix_part = nn.ModuleDict()
            self._prefix_disabled = False
        prefix_config = config.prefix_config()
        prefix_config.fill_from_model(model)
        check_prefix_model(model, f"{type(config).__name__}'s prefix tuning")
        emb = self._input_embeddings()
        part = PrefixPart(prefix_config, emb.weight.shape[1] if emb is not None else None, config.prefix_gated)
        ref = next(model.parameters(), None)
        if ref is not None:
            part = part.to(ref.device)
        part.requires_grad_(not config.inference_mode)
        self.prefix_part[adapter_name] = part

    def _input_embeddings(self) -> nn.Module | None:
        get = getattr(self.base_model.model, "get_input_embeddings", None)
        try:
            return get() if get is not None else None
        except (NotImplementedError, AttributeError):
            return None

    def _active_prefix_part(self) -> PrefixPart | None:
        parts = self._modules.get("prefix_part")
        if parts is None or self._prefix_disabled or self.active_adapter not in parts:
            return None
        return parts[self.active_adapter]

    def _gate_input(self, kwargs: dict) -> torch.Tensor:
        """Mask-weighted mean of the (encoder's) input embeddings, [batch, hidden]."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if kwargs.get("input_ids") is None:
                raise ValueError("the gated prefix reads the input: pass input_ids or inputs_embeds")
            embeds = self._input_embeddings()(kwargs["input_ids"])
        mask = kwargs.get("attention_mask")
        w = torch.ones(embeds.shape[:2], device=embeds.device) if mask is None else mask.to(embeds.device).float()
        return (embeds.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)

    def _with_prefix(self, args: tuple, kwargs: dict) -> dict:
        """The base model's forward kwargs with the active adapter's prefix in the KV cache."""
        part = self._active_prefix_part()
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise ValueError("pass the model inputs as keywords (input_ids=..., attention_mask=...)")
            kwargs = {**kwargs, "input_ids": args[0]}
        if part is None:
            return kwargs
        first = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        if first is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch = first.shape[0]
        gate_input = self._gate_input(kwargs) if hasattr(part, "gate") else None
        model = self.base_model.model
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        dtype = getattr(model, "dtype", None)
        prefix = part.prefix(batch, gate_input)
        if isinstance(dtype, torch.dtype):
            prefix = prefix.to(dtype)
        return prefix_forward_kwargs(model, prefix, part.num_layers, part.num_heads, kwargs,
                                     encoder_decoder=encoder_decoder)

    def _generate_with_prefix(self, args: tuple, kwargs: dict):
        """``generate`` with the active adapter's prefix: the first step gets the prefilled cache, every
        step the attention mask extended by the prefix (and explicit position ids shifted past it). A
        gated prefix's gate reads the prompt (input_ids / inputs_embeds and attention_mask as given)."""
        model = self.base_model.model
        part = self._active_prefix_part()
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise ValueError("generate: pass the inputs once, as input_ids=")
            kwargs = {**kwargs, "input_ids": args[0]}
        if part is None:
            return model.generate(**kwargs)
        gate_input = self._gate_input(kwargs) if hasattr(part, "gate") else None
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        v = part.encoder.embedding.num_embeddings
        mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
        dtype = getattr(model, "dtype", None)

        def prepare(inputs: dict) -> dict:
            cache = inputs.get("past_key_values")
            if cache is None or cache.get_seq_length() == 0:
                ref = inputs.get("decoder_input_ids" if encoder_decoder else "input_ids")
                if ref is None:
                    ref = inputs.get("inputs_embeds")
                prefix = part.prefix(ref.shape[0], gate_input)
                if isinstance(dtype, torch.dtype):
                    prefix = prefix.to(dtype)
                inputs["past_key_values"] = prefix_cache(model, prefix, part.num_layers, part.num_heads,
                                                         encoder_decoder)
            mask = inputs.get(mask_key)
            if isinstance(mask, torch.Tensor):
                inputs[mask_key] = extend_attention_mask(mask, v)
            elif mask is not None:
                raise ValueError("generate with a prefix supports 2-D attention masks only")
            if not encoder_decoder and inputs.get("position_ids") is not None:
                inputs["position_ids"] = inputs["position_ids"] + v
            return inputs
        with patch_prepare_inputs(model, prepare):
            return model.generate(**kwargs)

    def _prefix_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        parts = self._modules.get("prefix_part")
        return parts[adapter_name].saved_tensors() if parts is not None and adapter_name in parts else {}

    def _split_prefix_tensors(self, tensors: dict, adapter_name: str, source) -> dict:
        """Loads the prefix part's tensors; returns the rest (the tuner part's)."""
        parts = self._modules.get("prefix_part")
        if parts is None or adapter_name not in parts:
            return tensors
        mine = {k: v for k, v in tensors.items() if k in PREFIX_KEYS}
        parts[adapter_name].load_saved(mine, os.fspath(source))
        return {k: v for k, v in tensors.items() if k not in PREFIX_KEYS}

    def _delete_prefix_part(self, adapter_name: str) -> None:
        parts = self._modules.get("prefix_part")
        if parts is not None and adapter_name in parts:
            del parts[adapter_name]
