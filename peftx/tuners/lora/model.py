"""LoraModel: puts LoRA layers on a model's target modules and manages them model-wide (active
adapter, enable/disable, merge and unload, weighted combinations), as HF PEFT's LoraModel."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftx.quant.linear4bit import Linear4bit
from peftx.tuners.lora.config import LoraConfig
from peftx.tuners.lora.embedding import LoraEmbedding
from peftx.tuners.lora.inits import modifies_base
from peftx.tuners.lora.layer import LoraLayer, LoraLinear, LoraLinear4bit
from peftx.tuners.targets import _is_conv1d, pattern_value
from peftx.tuners.tuner import BaseTuner

LORA_LAYERS = (LoraLayer, LoraEmbedding)


def make_lora_layer(target: nn.Module, adapter_name: str, r: int, alpha: float, config: LoraConfig,
                    name: str = "") -> nn.Module:
    """The LoRA wrapper for a base module, chosen by the base module's type."""
    kw = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
              init_lora_weights=config.init_lora_weights, adapter_name=adapter_name)
    if isinstance(target, nn.Embedding):
        unsupported = ["use_dora=True" if config.use_dora else "",
                       f"init_lora_weights={config.init_lora_weights!r}" if modifies_base(config.init_lora_weights)
                       else ""]
        unsupported = [u for u in unsupported if u]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)} is not supported for nn.Embedding targets (this model's "
                             f"{name!r}); supported: torch.nn.Linear, transformers Conv1D, peftx.Linear4bit. "
                             "Remove the embedding from target_modules (or add it to exclude_modules)")
        return LoraEmbedding(target, **kw)
    kw.update(use_dora=config.use_dora, loftq_config=config.loftq_config)
    if isinstance(target, Linear4bit):
        return LoraLinear4bit(target, **kw)
    if isinstance(target, nn.Linear):
        return LoraLinear(target, **kw)
    if _is_conv1d(target):
        config.fan_in_fan_out = True
        return LoraLinear(target, fan_in_fan_out=True, **kw)
    raise ValueError(f"target module {name!r} of type {type(target).__name__} is not supported by LoRA"
                     f"{' (use_dora=True)' if config.use_dora else ''}; supported: torch.nn.Linear, transformers "
                     "Conv1D, peftx.Linear4bit (and torch.nn.Embedding without DoRA). Remove it from target_modules "
                     "(or add it to exclude_modules)")


class LoraModel(BaseTuner):
    prefix = "lora_"
    layer_types = LORA_LAYERS

    def _create_layer(self, target: nn.Module, adapter_name: str, config: LoraConfig, name: str) -> nn.Module:
        r, alpha = self._rank_alpha(config, name)
        return make_lora_layer(target, adapter_name, r, alpha, config, name)

    def _add_to_layer(self, layer: nn.Module, adapter_name: str, config: LoraConfig, name: str) -> None:
        r, alpha = self._rank_alpha(config, name)
        if isinstance(layer, LoraEmbedding):
            if config.use_dora or modifies_base(config.init_lora_weights):
                make_lora_layer(layer.base_layer, adapter_name, r, alpha, config, name)  # raises the error
            layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
            return
        layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights,
                          use_dora=config.use_dora, loftq_config=config.loftq_config)

    @staticmethod
    def _rank_alpha(config: LoraConfig, name: str) -> tuple[int, float]:
        return (pattern_value(config.rank_pattern, name, config.r),
                pattern_value(config.alpha_pattern, name, config.lora_alpha))

    def _mark_extra_trainable(self, config: LoraConfig) -> None:
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name == "bias" or name.endswith(".bias"):
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for m in self.model.modules():
                if isinstance(m, LORA_LAYERS) and getattr(m.base_layer, "bias", None) is not None:
                    m.base_layer.bias.requires_grad_(True)

    def extra_saved_keys(self, key: str, config: LoraConfig) -> bool:
        # bias='all' takes every '.bias' key, wrapper copies included, exactly as HF PEFT does.
        return (config.bias == "all" and key.endswith(".bias")) or \
            (config.bias == "lora_only" and key.endswith(".base_layer.bias"))

    # HF PEFT writes DoRA's magnitude (module lora_magnitude_vector.<adapter>, parameter weight) as
    # '...lora_magnitude_vector', the key of its older ParameterDict layout; it reads that key back.
    _MAGNITUDE = ".lora_magnitude_vector"

    def file_key(self, key: str) -> str:
        return key.removesuffix(".weight") if key.endswith(self._MAGNITUDE + ".weight") else key

    def key_from_file(self, key: str) -> str:
        return key + ".weight" if key.endswith(self._MAGNITUDE) else key

    def lora_layers(self):
        return self.adapter_layers()

    # --- weighted combinations ---------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """A new adapter from a weighted combination of existing ones, as HF PEFT: 'linear' (same rank:
        A = sum sign*sqrt(|w s|) A_i, B = sum sqrt(|w s|) B_i), 'cat' (rank = sum of ranks, exact sum
        of the weighted deltas) or 'svd' (truncated SVD of the weighted sum of deltas)."""
        if len(adapters) != len(weights):
            raise ValueError(f"adapters and weights must have the same length, got {len(adapters)} and {len(weights)}")
        for a in adapters:
            if a not in self.peft_config:
                raise ValueError(f"adapters: unknown adapter {a!r}; this model has {sorted(self.peft_config)}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} already exists")
        if combination_type not in ("linear", "cat", "svd"):
            raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
        if len(adapters) == 1:
            combination_type = "linear"
        ranks = [max([self.peft_config[a].r, *self.peft_config[a].rank_pattern.values()]) for a in adapters]
        if combination_type == "linear":
            if len(set(ranks)) != 1:
                raise ValueError(f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        else:
            new_rank = svd_rank or max(ranks)
        first = self.peft_config[adapters[0]]
        targets = [self.peft_config[a].target_modules for a in adapters]
        if all(isinstance(t, list) for t in targets):
            new_targets = sorted(set().union(*map(set, targets)))
        elif all(isinstance(t, str) for t in targets):
            new_targets = "|".join(f"({t})" for t in targets)
        else:
            raise ValueError("adapters mix list and regex target_modules; they cannot be combined")
        data = first.to_dict()
        data.update(r=new_rank, lora_alpha=new_rank, target_modules=new_targets, rank_pattern={}, alpha_pattern={},
                    init_lora_weights=True)
        self.peft_config[adapter_name] = LoraConfig.from_dict(data)
        self.inject_adapter(adapter_name)
        for m in self.lora_layers():
            if adapter_name in m.adapters:
                self._combine_into(m, adapters, weights, adapter_name, combination_type, new_rank)

    @staticmethod
    def _combine_into(m, adapters, weights, name, kind, new_rank):
        def pair(a):
            if isinstance(m, LoraEmbedding):
                return m.lora_embedding_A[a], m.lora_embedding_B[a]
            return m.lora_A[a].weight, m.lora_B[a].weight
        A_new, B_new = pair(name)
        present = [(a, w) for a, w in zip(adapters, weights) if a in m.adapters]
        with torch.no_grad():
            A_new.zero_()
            B_new.zero_()
            if kind == "linear":
                for a, w in present:
                    ws = w * m.adapters[a].scaling
                    A, B = pair(a)
                    A_new += math.copysign(math.sqrt(abs(ws)), ws) * A
                    B_new += math.sqrt(abs(ws)) * B
            elif kind == "cat":
                As = [pair(a)[0] * (w * m.adapters[a].scaling) for a, w in present]
                Bs = [pair(a)[1] for a, _ in present]
                A_cat, B_cat = torch.cat(As, 0), torch.cat(Bs, 1)
                A_new[:A_cat.shape[0]] = A_cat
                B_new[:, :B_cat.shape[1]] = B_cat
            else:
                delta = sum(w * m.adapters[a].scaling * (pair(a)[1].float() @ pair(a)[0].float())
                            for a, w in present)
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                k = min(new_rank, S.numel())
                B_new[:, :k] = (U[:, :k] * S[:k]).to(B_new.dtype)
                A_new[:k] = Vh[:k].to(A_new.dtype)
