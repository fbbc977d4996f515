"""Which modules of a model a tuner config targets: HF PEFT's matching rules (exact name or '.'-suffix,
a regex string with full match, 'all-linear', exclude_modules, layers_to_transform, rank/alpha
patterns) and LoRA's default targets per architecture (other methods pass their own table)."""

from __future__ import annotations

import difflib
import re

from torch import nn

from peftx.quant.linear4bit import Linear4bit

# HF PEFT's defaults when target_modules is omitted, by transformers model_type.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "layoutlm": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"], "mt5": ["q", "v"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"], "mpt": ["Wqkv"],
}

_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit)) or _is_conv1d(module)


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_target_modules(model: nn.Module, defaults: dict[str, list[str]] | None = None) -> list[str]:
    defaults = DEFAULT_TARGET_MODULES if defaults is None else defaults
    model_type = model_type_of(model)
    if model_type not in defaults:
        raise ValueError(f"target_modules was not given and peftx has no default for model_type {model_type!r}; "
                         f"pass target_modules (names, a regex, or 'all-linear'). Known: {sorted(defaults)}")
    return list(defaults[model_type])


def _matches(spec, key: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + t) for t in spec)


def _layer_ok(config, key: str) -> bool:
    if getattr(config, "layers_to_transform", None) is None:
        return True
    patterns = getattr(config, "layers_pattern", None)
    if patterns is None:
        m = _LAYER_INDEX.match(key)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        m = None
        for p in patterns:
            m = re.match(rf".*\.{p}\.(\d+)\.", key)
            if m:
                break
    return m is not None and int(m.group(1)) in config.layers_to_transform


# Name prefixes of the sub-modules every tuner puts inside the layers it wraps (tuners add theirs).
ADAPTER_PREFIXES: set[str] = {"lora_"}


def _is_adapter_internal(name: str) -> bool:
    # Modules that belong to adapters already in the model: never targets themselves.
    return any(p in ("base_layer", "original_module", "modules_to_save") or p.startswith(tuple(ADAPTER_PREFIXES))
               for p in name.split("."))


def output_layer_names(model: nn.Module) -> set[str]:
    out = getattr(model, "get_output_embeddings", lambda: None)()
    names = {n for n, m in model.named_modules() if out is not None and m is out}
    return names | {"lm_head"}


def _under(name: str, heads) -> bool:
    # name is one of the heads (matched as a '.'-suffix) or inside one.
    parts = name.split(".")
    return any(h.split(".") == parts[i:i + len(h.split("."))] for h in heads for i in range(len(parts)))


def select_targets(model: nn.Module, config, skip: set[str] = frozenset(),
                   defaults: dict[str, list[str]] | None = None) -> list[str]:
    """Names of the modules the config adapts, never inside the ``skip`` heads (modules_to_save);
    an error that lists close names if none match. ``defaults``: the method's target table by
    model_type, used when config.target_modules is None (LoRA's by default)."""
    spec = config.target_modules if config.target_modules is not None else default_target_modules(model, defaults)
    all_linear = spec == "all-linear" or (isinstance(spec, list) and spec == ["all-linear"])
    outputs = output_layer_names(model) if all_linear else set()
    chosen = []
    names = [n for n, _ in model.named_modules() if n and not _is_adapter_internal(n)]
    for name, module in model.named_modules():
        if not name or _under(name, skip) or _is_adapter_internal(name):
            continue
        if all_linear:
            hit = is_linear_like(module) and name.split(".")[-1] not in outputs and name not in outputs
        else:
            hit = _matches(spec, name)
        if hit and not _matches(getattr(config, "exclude_modules", None), name) and _layer_ok(config, name):
            chosen.append(name)
    if not chosen:
        wanted = [spec] if isinstance(spec, str) else list(spec)
        leaves = sorted({n.split(".")[-1] for n in names})
        close = list(dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(str(w), leaves, n=5,
                                                                                            cutoff=0.5)))
        raise ValueError(f"target_modules {spec!r} matched no module of {type(model).__name__}"
                         + (f"; close names: {close}" if close else "")
                         + f". Module names end with e.g. {leaves[:12]}")
    return chosen


def pattern_value(patterns: dict, key: str, default):
    """HF PEFT's rank/alpha pattern lookup: the first pattern that matches the end of the name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default
