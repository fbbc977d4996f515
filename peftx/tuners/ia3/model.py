"""IA3Model: (IA)^3 vectors on a model's target modules (HF PEFT's default targets and feed-forward
modules per architecture), with merge, unmerge and unload."""

from __future__ import annotations

import re

from torch import nn

from peftx.tuners.ia3.config import IA3Config
from peftx.tuners.ia3.layer import IA3Linear
from peftx.tuners.targets import _is_conv1d, model_type_of
from peftx.tuners.tuner import BaseTuner

# HF PEFT's (IA)^3 defaults when target_modules / feedforward_modules are omitted, by model_type.
IA3_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"], "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"],
    "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"], "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


def is_feedforward(config: IA3Config, name: str) -> bool:
    """HF PEFT's rule: a regex string must match the whole name; a list entry must END the name
    (a plain suffix, not only at a '.': 'output.dense' also picks 'attention.output.dense')."""
    spec = config.feedforward_modules
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(s) for s in spec or ())


class IA3Model(BaseTuner):
    prefix = "ia3_"
    layer_types = (IA3Linear,)
    default_targets = IA3_TARGET_MODULES

    def select_targets(self, config: IA3Config, skip):
        # As HF PEFT, the architecture's defaults are written into the config (and so into its file).
        model_type = model_type_of(self.model)
        if config.target_modules is None and model_type in IA3_TARGET_MODULES:
            config.target_modules = list(IA3_TARGET_MODULES[model_type])
        if config.feedforward_modules is None:
            if model_type not in IA3_FEEDFORWARD_MODULES:
                raise ValueError(f"feedforward_modules was not given and peftx has no default for model_type "
                                 f"{model_type!r}; pass feedforward_modules (a list, possibly empty, or a regex)")
            config.feedforward_modules = list(IA3_FEEDFORWARD_MODULES[model_type])
        return super().select_targets(config, skip)

    def _create_layer(self, target: nn.Module, adapter_name: str, config: IA3Config, name: str) -> nn.Module:
        if type(target).__name__ == "Linear4bit" or not (isinstance(target, nn.Linear) or _is_conv1d(target)):
            raise ValueError(f"target module {name!r} of type {type(target).__name__} is not supported by (IA)^3; "
                             "supported: torch.nn.Linear, transformers Conv1D")
        if _is_conv1d(target):
            config.fan_in_fan_out = True
        return IA3Linear(target, is_feedforward(config, name), config.init_ia3_weights, adapter_name)

    def _add_to_layer(self, layer: IA3Linear, adapter_name: str, config: IA3Config, name: str) -> None:
        if layer.is_feedforward != is_feedforward(config, name):
            raise ValueError(f"module {name!r} is a feed-forward module for one adapter and not for another; "
                             "adapters on one module must agree on feedforward_modules")
        layer.add_adapter(adapter_name, config.init_ia3_weights)
