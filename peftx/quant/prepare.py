"""Model-level QLoRA helpers: quantize_model (nn.Linear -> peftx.Linear4bit, also converting layers
bitsandbytes quantized) and prepare_model_for_kbit_training (as HF PEFT's)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from peftx.quant.linear4bit import Linear4bit
from peftx.quant.nf4_weight import NF4Weight

logger = logging.getLogger(__name__)


def _bnb_linear4bit_type():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def _from_bnb(module) -> Linear4bit:
    """A peftx Linear4bit holding the very bytes of a bitsandbytes Linear4bit (no re-quantization)."""
    state = {}
    for k, v in module.weight.quant_state.as_dict(packed=True).items():
        state["weight." + k] = v
    state["weight"] = module.weight.data
    w = NF4Weight.from_bnb_state_dict(state, "")
    return Linear4bit(w, module.bias.data if module.bias is not None else None,
                      compute_dtype=getattr(module, "compute_dtype", None))


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = torch.bfloat16,
                   skip_modules: list[str] | tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replaces the model's ``nn.Linear`` layers (except names ending in ``skip_modules``) by NF4
    ``peftx.Linear4bit`` layers, in place; bitsandbytes ``Linear4bit`` layers are converted byte for byte."""
    bnb_type = _bnb_linear4bit_type()
    names = [n for n, m in model.named_modules()
             if n and (type(m) is nn.Linear or (bnb_type is not None and isinstance(m, bnb_type)))
             and not any(n == s or n.endswith("." + s) for s in skip_modules)]
    if not names:
        raise ValueError(f"quantize_model: {type(model).__name__} has no nn.Linear layer outside {list(skip_modules)}")
    for name in tqdm(names, desc="quantizing to NF4", disable=len(names) < 8, leave=False):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m = getattr(parent, child)
        if bnb_type is not None and isinstance(m, bnb_type):
            new = _from_bnb(m)
        else:
            new = Linear4bit.from_linear(m, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
        setattr(parent, child, new)
    model.is_peftx_quantized = True
    logger.info("quantize_model: %d linear layers now NF4 (blocksize %d, double_quant %s)", len(names), blocksize,
                double_quant)
    return model


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """As HF PEFT's: freezes every parameter, upcasts the non-quantized fp16/bf16 parameters (norms,
    embeddings, heads) to fp32, and optionally turns on gradient checkpointing with input gradients
    (so checkpointed blocks see a tensor that requires grad even though the embeddings are frozen)."""
    quantized = any(isinstance(m, Linear4bit) for m in model.modules())
    for p in model.parameters():
        p.requires_grad_(False)
    if quantized:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            def make_inputs_require_grad(_module, _input, output):
                output.requires_grad_(True)
            model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", True)
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
