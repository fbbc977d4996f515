"""AdaLoraModel: AdaLoRA layers on a model's target modules, the rank allocation during training
(``update_and_allocate``), the orthogonality regulariser added to the model's loss, and HF PEFT's file
rules (tensors shrunk to the allocated ranks, ``ranknum`` not saved, ``rank_pattern`` in the config)."""

from __future__ import annotations

import torch
from torch import nn

from peftx.quant.linear4bit import Linear4bit
from peftx.tuners.adalora.config import AdaLoraConfig
from peftx.tuners.adalora.layer import AdaLoraLinear
from peftx.tuners.adalora.rank_allocator import RankAllocator
from peftx.tuners.lora.model import LoraModel
from peftx.tuners.targets import _is_conv1d

# HF PEFT's AdaLoRA defaults when target_modules is omitted, by transformers model_type.
ADALORA_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"], "deberta": ["in_proj"],
}


class AdaLoraModel(LoraModel):
    layer_types = (AdaLoraLinear,)
    default_targets = ADALORA_TARGET_MODULES

    trainable_adapter_name: str | None = None
    rankallocator: RankAllocator | None = None

    def _layers_of(self, adapter_name: str) -> dict[str, AdaLoraLinear]:
        return {n: m for n, m in self.model.named_modules()
                if isinstance(m, AdaLoraLinear) and adapter_name in m.adapters}

    def inject_adapter(self, adapter_name: str, skip=frozenset()) -> list[str]:
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError("AdaLoRA trains one adapter at a time: set inference_mode=True in the configs of all "
                             f"adapters but the one to train (trainable now: {trainable})")
        targets = super().inject_adapter(adapter_name, skip)
        config = self.peft_config[adapter_name]
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self._layers_of(adapter_name), config, adapter_name)
        return targets

    def _create_layer(self, target: nn.Module, adapter_name: str, config: AdaLoraConfig, name: str) -> nn.Module:
        if isinstance(target, Linear4bit) or not (isinstance(target, nn.Linear) or _is_conv1d(target)):
            raise ValueError(f"target module {name!r} of type {type(target).__name__} is not supported by AdaLoRA; "
                             "supported: torch.nn.Linear, transformers Conv1D")
        if _is_conv1d(target):
            config.fan_in_fan_out = True
        return AdaLoraLinear(target, r=config.init_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             init_lora_weights=config.init_lora_weights, adapter_name=adapter_name)

    def _add_to_layer(self, layer: nn.Module, adapter_name: str, config: AdaLoraConfig, name: str) -> None:
        layer.add_adapter(adapter_name, config.init_r, config.lora_alpha, config.lora_dropout,
                          init_lora_weights=config.init_lora_weights)

    def add_weighted_adapter(self, *args, **kwargs):
        raise TypeError("AdaLoraModel does not support add_weighted_adapter (as HF PEFT); use LoRA adapters")

    # --- training ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and self.trainable_adapter_name is not None:
            weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
            outputs.loss = loss + weight * self.orth_reg_loss()
        return outputs

    def orth_reg_loss(self) -> torch.Tensor | float:
        """Mean over the trainable adapter's A and B of ||P P^T - I||_F (A) and ||Q^T Q - I||_F (B).
        Factors of one shape are stacked so each shape costs one batched product."""
        name = self.trainable_adapter_name
        groups: dict[tuple, list[torch.Tensor]] = {}
        for m in self._layers_of(name).values():
            groups.setdefault(("A", *m.lora_A[name].shape), []).append(m.lora_A[name])
            groups.setdefault(("B", *m.lora_B[name].shape), []).append(m.lora_B[name])
        total, count = 0.0, 0
        for (kind, *_), ps in groups.items():
            P = torch.stack(ps)
            cov = P @ P.transpose(1, 2) if kind == "A" else P.transpose(1, 2) @ P
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            total = total + torch.linalg.matrix_norm(cov - eye, ord="fro").sum()
            count += len(ps)
        return total / count if count else 0.0

    def update_and_allocate(self, global_step: int) -> None:
        """Updates the importance scores and masks singular values to the step's budget; call it every
        training step after ``loss.backward()`` and before ``optimizer.zero_grad()``."""
        if self.rankallocator is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (this model has only adapters "
                             "in inference_mode)")
        config = self.peft_config[self.trainable_adapter_name]
        end = config.total_step - config.tfinal
        if global_step < end:
            _, pattern = self.rankallocator.update_and_allocate(global_step)
            if pattern:
                config.rank_pattern = pattern
        elif global_step == end:
            _, pattern = self.rankallocator.update_and_allocate(global_step, force_mask=True)
            config.rank_pattern = pattern
            self.rankallocator.reset_ipt()
        else:
            self.rankallocator.mask_using_rank_pattern(config.rank_pattern)

    # --- files -------------------------------------------------------------------------------------
    def to_file_tensors(self, tensors: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        """HF PEFT writes only the kept singular triplets of each module (rank_pattern)."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return tensors
        out = dict(tensors)
        for key, keep in pattern.items():
            module = _module_of(key, adapter_name)
            mask = torch.as_tensor(keep, dtype=torch.bool)
            for part in ("lora_A", "lora_E", "lora_B"):
                k = f"base_model.model.{module}.{part}"
                if k in out and mask.numel() == (out[k].shape[1] if part == "lora_B" else out[k].shape[0]):
                    t = out[k]
                    out[k] = t[:, mask.to(t.device)] if part == "lora_B" else t[mask.to(t.device)]
        return out

    def before_loading_tensors(self, adapter_name: str) -> None:
        """Shrinks the layers to the file's allocation (rank_pattern) so its tensors fit."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return
        for key, keep in pattern.items():
            layer = self.model.get_submodule(_module_of(key, adapter_name))
            if layer.adapters[adapter_name].r == len(keep):
                layer.resize(adapter_name, keep)


def _module_of(pattern_key: str, adapter_name: str) -> str:
    """'model.layers.0.q_proj.lora_E' or '… .lora_E.<adapter>' -> 'model.layers.0.q_proj'."""
    parts = pattern_key.split(".")
    if parts[-1] == adapter_name and len(parts) > 1 and parts[-2] == "lora_E":
        parts = parts[:-1]
    return ".".join(parts[:-1])
