"""The PeftModel side of the prompt-learning methods (prompt tuning, P-tuning, prefix tuning,
multitask prompt tuning). As in HF PEFT such a PeftModel wraps no module: ``base_model`` is the
transformers model itself (frozen) and the adapters live in ``prompt_encoder`` (a ModuleDict keyed by
adapter name). The forward per task:

- prompt tuning, P-tuning, multitask: the prompts [batch, V, dim] are prepended to the input
  embeddings; the attention mask gets V ones in front, labels (causal LM, token classification)
  V ignored positions, token_type_ids V zeros, explicit position ids become [0..V-1, V + ids];
- prefix tuning: the prefix reaches every attention layer as a prefilled ``past_key_values`` cache
  (peftx/tuners/prefix_tuning/cache.py), the attention mask gets V ones in front and explicit
  position ids are shifted by V.

``generate`` (causal and seq2seq LMs) wraps the base model's ``prepare_inputs_for_generation`` for
the call: the first step gets the prompts (or the prefilled cache), every step gets the extended mask
and shifted positions, so left-padded batches generate as their rows would alone.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from peftx.tuners.prefix_tuning.cache import (check_prefix_model, extend_attention_mask, prefix_cache,
                                              prefix_forward_kwargs)
from peftx.utils_modules import ModulesToSaveWrapper, get_parent, patch_prepare_inputs

PREFIX = "PREFIX_TUNING"
MULTITASK = "MULTITASK_PROMPT_TUNING"


def _type(config) -> str:
    return getattr(config.peft_type, "value", config.peft_type)


def _batch_size(input_ids, inputs_embeds) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("pass input_ids or inputs_embeds")


def _virtual_positions(position_ids: torch.Tensor, v: int) -> torch.Tensor:
    """Explicit position ids of the real tokens -> ids for [virtual tokens, real tokens]."""
    head = torch.arange(v, device=position_ids.device, dtype=position_ids.dtype).expand(*position_ids.shape[:-1], v)
    return torch.cat((head, position_ids + v), dim=-1)


class PromptLearningMixin:
    """Methods PeftModel uses when its config is a prompt-learning config."""

    _labels_per_token = True  # labels align with tokens (causal LM, token classification): V ignored in front

    # --- setup -------------------------------------------------------------------------------------
    def _init_prompt_learning(self, model: nn.Module, config, adapter_name: str) -> None:
        self.base_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.prompt_encoder = nn.ModuleDict()
        self._prompt_disabled = False
        self._add_prompt_encoder(adapter_name, config)

    def _word_embeddings(self) -> nn.Module | None:
        get = getattr(self.base_model, "get_input_embeddings", None)
        try:
            return get() if get is not None else None
        except (NotImplementedError, AttributeError):
            return None

    def _add_prompt_encoder(self, adapter_name: str, config) -> None:
        model = self.base_model
        config.fill_from_model(model)
        if _type(config) == PREFIX:
            check_prefix_model(model)
        elif self._word_embeddings() is None:
            raise ValueError(f"{_type(config)} prepends embeddings to the input embeddings, but "
                             f"{type(model).__name__} has no get_input_embeddings(); use a transformers model")
        encoder = config.build_encoder(self._word_embeddings())
        ref = next(model.parameters(), None)
        if ref is not None:
            encoder = encoder.to(ref.device)
        self.prompt_encoder[adapter_name] = encoder
        encoder.requires_grad_(not config.inference_mode)

    @contextlib.contextmanager
    def _prompt_disabled_context(self):
        wrappers = [m for m in self.base_model.modules() if isinstance(m, ModulesToSaveWrapper)]
        self._prompt_disabled = True
        for m in wrappers:
            m.disable_adapters = True
        try:
            yield
        finally:
            self._prompt_disabled = False
            for m in wrappers:
                m.disable_adapters = False

    # --- prompts -----------------------------------------------------------------------------------
    @staticmethod
    def _check_task_ids(config, task_ids) -> None:
        if _type(config) != MULTITASK and task_ids is not None:
            raise ValueError(f"task_ids is only used by multitask prompt tuning, not {_type(config)}")

    def _prompts(self, batch_size: int, task_ids=None, dtype=None) -> torch.Tensor:
        config = self.peft_config[self.active_adapter]
        encoder = self.prompt_encoder[self.active_adapter]
        self._check_task_ids(config, task_ids)
        prompts = encoder.prompts(batch_size, task_ids)
        return prompts if dtype is None else prompts.to(dtype)

    def _prefix(self, batch_size: int) -> torch.Tensor:
        prefix = self.prompt_encoder[self.active_adapter].prompts(batch_size)
        dtype = getattr(self.base_model, "dtype", None)
        return prefix.to(dtype) if isinstance(dtype, torch.dtype) else prefix

    def _prefix_cache(self, batch_size: int, encoder_decoder: bool):
        config = self.peft_config[self.active_adapter]
        return prefix_cache(self.base_model, self._prefix(batch_size), config.num_layers, config.num_attention_heads,
                            encoder_decoder)

    def _prefix_forward_kwargs(self, batch_size: int, kwargs: dict, encoder_decoder: bool = False) -> dict:
        config = self.peft_config[self.active_adapter]
        return prefix_forward_kwargs(self.base_model, self._prefix(batch_size), config.num_layers,
                                     config.num_attention_heads, kwargs, encoder_decoder=encoder_decoder)

    def _embed_with_prompts(self, input_ids, inputs_embeds, task_ids, v_slice=None):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self._word_embeddings()(input_ids)
        prompts = self._prompts(inputs_embeds.shape[0], task_ids, inputs_embeds.dtype)
        head = prompts if v_slice is None else prompts[:, v_slice]
        return torch.cat((head, inputs_embeds), dim=1), prompts

    # --- forward -----------------------------------------------------------------------------------
    def _prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, task_ids=None,
                        **kwargs):
        """Decoder-only / encoder-only forward (causal LM, sequence and token classification, …)."""
        if self._prompt_disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, **kwargs)
        config = self.peft_config[self.active_adapter]
        v = config.num_virtual_tokens
        batch = _batch_size(input_ids, inputs_embeds)
        if _type(config) == PREFIX:
            self._check_task_ids(config, task_ids)
            kw = self._prefix_forward_kwargs(batch, {**kwargs, "attention_mask": attention_mask})
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels, **kw)
        inputs_embeds, _ = self._embed_with_prompts(input_ids, inputs_embeds, task_ids)
        kwargs["attention_mask"] = extend_attention_mask(attention_mask, v)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _virtual_positions(kwargs["position_ids"], v)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat((tt.new_zeros(batch, v), tt), dim=1)
        if labels is not None and self._labels_per_token:
            labels = torch.cat((labels.new_full((batch, v), -100), labels), dim=1)
        return self.base_model(inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    def _prompt_forward_seq2seq(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, task_ids=None,
                                **kwargs):
        kwargs.update(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                      decoder_inputs_embeds=decoder_inputs_embeds, labels=labels)
        if self._prompt_disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   **kwargs)
        config = self.peft_config[self.active_adapter]
        v = config.num_virtual_tokens
        batch = _batch_size(input_ids, inputs_embeds)
        if _type(config) == PREFIX:
            self._check_task_ids(config, task_ids)
            kw = self._prefix_forward_kwargs(batch, kwargs, encoder_decoder=True)
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   **kw)
        inputs_embeds, prompts = self._embed_with_prompts(input_ids, inputs_embeds, task_ids, slice(0, v))
        attention_mask = extend_attention_mask(attention_mask, v)
        if _type(config) == MULTITASK and config.num_transformer_submodules == 2:
            # multitask prompts also lead the decoder's inputs (HF PEFT's layout)
            if decoder_inputs_embeds is None:
                if decoder_input_ids is None:
                    if labels is None:
                        raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels")
                    decoder_input_ids = self.base_model._shift_right(labels)
                decoder_inputs_embeds = self._word_embeddings()(decoder_input_ids)
            kwargs["decoder_inputs_embeds"] = torch.cat((prompts[:, v:], decoder_inputs_embeds), dim=1)
            kwargs["decoder_input_ids"] = None
            kwargs["decoder_attention_mask"] = extend_attention_mask(decoder_attention_mask, v)
            if labels is not None:
                kwargs["labels"] = torch.cat((labels.new_full((batch, v), -100), labels), dim=1)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # --- generate ----------------------------------------------------------------------------------
    def _prompt_generate(self, *args, task_ids=None, **kwargs):
        if self._prompt_disabled:
            return self.base_model.generate(*args, **kwargs)
        config = self.peft_config[self.active_adapter]
        self._check_task_ids(config, task_ids)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise ValueError("generate: pass the inputs once, as input_ids=")
            kwargs["input_ids"] = args[0]
        if getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False):
            return self._prompt_generate_seq2seq(config, task_ids, kwargs)
        v = config.num_virtual_tokens
        is_prefix = _type(config) == PREFIX
        if _type(config) == MULTITASK:
            batch = _batch_size(kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
            task_ids = self.prompt_encoder[self.active_adapter].check_task_ids(task_ids, batch)

        def prepare(inputs: dict) -> dict:
            cache = inputs.get("past_key_values")
            first = cache is None or cache.get_seq_length() == 0
            mask = inputs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                inputs["attention_mask"] = extend_attention_mask(mask, v)
            elif mask is not None:
                raise ValueError("generate with prompt learning supports 2-D attention masks and dynamic caches only")
            pos = inputs.get("position_ids")
            if pos is not None:
                inputs["position_ids"] = _virtual_positions(pos, v) if first and not is_prefix else pos + v
            if not first:
                return inputs
            ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
            batch = _batch_size(ids, embeds)
            if is_prefix:
                inputs["past_key_values"] = self._prefix_cache(batch, encoder_decoder=False)
            else:
                tasks = task_ids
                if tasks is not None and batch != tasks.shape[0]:
                    # beam search / num_return_sequences expanded each row in place
                    tasks = tasks.repeat_interleave(batch // tasks.shape[0])
                inputs["inputs_embeds"], _ = self._embed_with_prompts(ids, embeds, tasks)
                inputs["input_ids"] = None
            return inputs
        with patch_prepare_inputs(self.base_model, prepare):
            return self.base_model.generate(**kwargs)

    def _prompt_generate_seq2seq(self, config, task_ids, kwargs):
        v = config.num_virtual_tokens
        if _type(config) == PREFIX:
            def prepare(inputs: dict) -> dict:
                cache = inputs.get("past_key_values")
                if cache is None or cache.get_seq_length() == 0:
                    batch = inputs["decoder_input_ids"].shape[0]
                    inputs["past_key_values"] = self._prefix_cache(batch, encoder_decoder=True)
                if isinstance(inputs.get("decoder_attention_mask"), torch.Tensor):
                    inputs["decoder_attention_mask"] = extend_attention_mask(inputs["decoder_attention_mask"], v)
                return inputs
            with patch_prepare_inputs(self.base_model, prepare):
                return self.base_model.generate(**kwargs)
        if kwargs.get("encoder_outputs") is not None:
            raise ValueError("encoder_outputs: the prompts go into the encoder; pass input_ids instead")
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if _type(config) == MULTITASK:
            task_ids = self.prompt_encoder[self.active_adapter].check_task_ids(task_ids, _batch_size(ids, embeds))
        kwargs["inputs_embeds"], _ = self._embed_with_prompts(ids, embeds, task_ids, slice(0, v))
        kwargs["attention_mask"] = extend_attention_mask(kwargs.get("attention_mask"), v)
        return self.base_model.generate(**kwargs)

    # --- save / load -------------------------------------------------------------------------------
    def _prompt_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = dict(self.prompt_encoder[adapter_name].saved_tensors())
        sd = self.state_dict()
        for wp in self._wrapper_prefixes:
            inner = f"{wp}.modules_to_save.{adapter_name}."
            out.update({wp + "." + k[len(inner):]: v for k, v in sd.items() if k.startswith(inner)})
        return out

    def _prompt_load(self, tensors: dict[str, torch.Tensor], adapter_name: str, source) -> None:
        import os
        src = os.fspath(source)
        own = self.state_dict(keep_vars=True)
        wrapped, rest = {}, {}
        for k, t in tensors.items():
            wp = next((p for p in self._wrapper_prefixes if k.startswith(p + ".")), None)
            if wp is None:
                rest[k] = t
                continue
            target = f"{wp}.modules_to_save.{adapter_name}.{k[len(wp) + 1:]}"
            if target not in own or own[target].shape != t.shape:
                raise ValueError(f"adapter {src!r}: tensor {k!r} has no place of shape {tuple(t.shape)} in this model")
            wrapped[target] = t
        known = {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
        unexpected = sorted(set(rest) - known)
        if unexpected:
            raise ValueError(f"adapter {src!r} has tensors with no place in this model (e.g. {unexpected[:3]}): it was "
                             "saved for another method or model")
        self.prompt_encoder[adapter_name].load_saved(rest, src)
        with torch.no_grad():
            for k, t in wrapped.items():
                own[k].copy_(t.to(own[k].dtype))

    # --- adapters ----------------------------------------------------------------------------------
    def _prompt_delete(self, adapter_name: str) -> None:
        del self.prompt_encoder[adapter_name]
        for m in self.base_model.modules():
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
                del m.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]

    def _prompt_unload(self) -> nn.Module:
        """The base model without the prompts; modules_to_save wrappers give way to the active adapter's
        trained copy."""
        for name, m in list(self.base_model.named_modules()):
            if isinstance(m, ModulesToSaveWrapper):
                parent, child = get_parent(self.base_model, name)
                setattr(parent, child, m.modules_to_save[m.active_adapter] if m.active_adapter in m.modules_to_save
                        else m.original_module)
        return self.base_model
