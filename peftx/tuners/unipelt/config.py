"""UniPELTConfig: UniPELT (Mao et al. 2022), a gated mixture of LoRA, prefix tuning and a sequential
bottleneck adapter. Each sub-method's contribution is scaled by its own learned gate
``sigmoid(W_g x + b)``:

- LoRA on the attention query/value projections (``target_modules``; default: the LoRA table, e.g.
  q_proj/v_proj, query/value, c_attn, q/v), gate per token from the layer's input
  (peftx/tuners/unipelt/gated_lora.py);
- prefix tuning, keys and values of layer l scaled by a gate per example and layer
  (peftx/composed_model.py);
- a sequential bottleneck adapter after the feed-forward (``placement='pfeiffer'``; 'houlsby' adds
  one after attention), gate per token from the adapter's input (peftx/tuners/bottleneck/layer.py).

Defaults follow the paper's GLUE setup (BERT-base): LoRA r=8, alpha=16; prefix length 10 with the
MLP reparameterization; adapter bottleneck hidden // 16 (48 at width 768), ReLU. peftx only (files:
adapter_config.json with ``"peft_type": "UNIPELT"`` + adapter_model.safetensors holding ``lora_*``,
``bottleneck_*``, ``prompt_embeddings`` and ``prefix_gate.*``). Nothing merges (the gates depend on
the input); ``unload()`` returns the base model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peftx.config import PeftConfig, PeftType
from peftx.tuners.bottleneck.config import PLACEMENTS, check_adapter_args, check_module_rules
from peftx.tuners.lora.adapters import check_spec
from peftx.tuners.mam.config import prefix_config_of


@dataclass
class UniPELTConfig(PeftConfig):
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "LoRA's modules (LoRA's matching rules); None: the LoRA default (query and value projections)."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never given LoRA."})
    num_virtual_tokens: int = field(default=10, metadata={"help": "Prefix length (virtual tokens per layer)."})
    prefix_projection: bool = field(default=True, metadata={
        "help": "Compute the prefix with Li & Liang's two-layer tanh MLP (training only; the file holds its output)."})
    encoder_hidden_size: int | None = field(default=512, metadata={
        "help": "Middle width of the prefix MLP; None: the model's key/value width."})
    placement: str = field(default="pfeiffer", metadata={
        "help": "Adapter placement: 'pfeiffer' (after the feed-forward) or 'houlsby' (also after attention)."})
    reduction_factor: float = field(default=16, metadata={"help": "Adapter bottleneck = hidden // reduction_factor."})
    bottleneck_size: int | None = field(default=None, metadata={"help": "The adapter's bottleneck width, if set."})
    non_linearity: str = field(default="relu", metadata={"help": "relu, gelu, swish (= silu), silu or tanh."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplies the adapter's output."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    attn_modules: list[str] | dict[str, str] | None = field(default=None, metadata={
        "help": "Attention output projections for 'houlsby' adapters; None: peftx's table."})
    ffn_modules: list[str] | dict[str, str] | None = field(default=None, metadata={
        "help": "Feed-forward output projections for the adapters; None: peftx's table."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only these layer indices get LoRA and adapters (the prefix covers every layer)."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})

    form: ClassVar[str] = "sequential"
    prefix_gated: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.UNIPELT
        check_spec(self.r, self.lora_alpha, self.lora_dropout, False)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        check_adapter_args(self.reduction_factor, self.bottleneck_size, self.non_linearity, self.scaling,
                           self.adapter_dropout)
        self.attn_modules = check_module_rules("attn_modules", self.attn_modules)
        self.ffn_modules = check_module_rules("ffn_modules", self.ffn_modules)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        self.prefix_config()

    def prefix_config(self):
        return prefix_config_of(self)
