"""MAMConfig: the "mix-and-match" adapter of He et al. 2021 ("Towards a unified view of
parameter-efficient transfer learning", their best setting): prefix tuning in every attention layer
plus a scaled parallel bottleneck adapter on every feed-forward sublayer. peftx only (files:
adapter_config.json with ``"peft_type": "MAM"`` + adapter_model.safetensors holding the adapter's
``bottleneck_*`` tensors and the prefix table ``prompt_embeddings``).

Defaults (He et al., section 4.5, on 1024-wide BART/mBART-large): prefix length 30 (Li & Liang's MLP
reparameterization, ``prefix_projection=True``, middle width 512); parallel FFN adapter with scaling 4,
ReLU and bottleneck 512 = hidden // 2 at their width, hence ``reduction_factor=2`` (set
``bottleneck_size=512`` for the literal width). Where the parallel adapter reads and adds: see
peftx/tuners/bottleneck/placements.py (form 'parallel', feed-forward sites)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peftx.config import PeftConfig, PeftType
from peftx.tuners.bottleneck.config import check_adapter_args, check_module_rules


def prefix_config_of(config):
    """The PrefixTuningConfig of a composed config's prefix part (dimensions filled from the model later)."""
    from peftx.tuners.prefix_tuning.config import PrefixTuningConfig
    return PrefixTuningConfig(task_type=config.task_type, inference_mode=config.inference_mode,
                              num_virtual_tokens=config.num_virtual_tokens, prefix_projection=config.prefix_projection,
                              encoder_hidden_size=config.encoder_hidden_size)


@dataclass
class MAMConfig(PeftConfig):
    num_virtual_tokens: int = field(default=30, metadata={"help": "Prefix length (virtual tokens per layer)."})
    prefix_projection: bool = field(default=True, metadata={
        "help": "Compute the prefix with Li & Liang's two-layer tanh MLP (training only; the file holds its output)."})
    encoder_hidden_size: int | None = field(default=512, metadata={
        "help": "Middle width of the prefix MLP; None: the model's key/value width."})
    reduction_factor: float = field(default=2, metadata={
        "help": "FFN adapter bottleneck = hidden // reduction_factor (ignored when bottleneck_size is set)."})
    bottleneck_size: int | None = field(default=None, metadata={"help": "The FFN adapter's bottleneck width, if set."})
    non_linearity: str = field(default="relu", metadata={"help": "relu, gelu, swish (= silu), silu or tanh."})
    scaling: float = field(default=4.0, metadata={"help": "Multiplies the parallel adapter's output (He et al.: 4)."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    ffn_modules: list[str] | dict[str, str] | None = field(default=None, metadata={
        "help": "{FFN output projection suffix: FFN module suffix}; None: peftx's table for the architecture."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only these layer indices get the FFN adapter (the prefix covers every layer)."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})

    placement: ClassVar[str] = "pfeiffer"
    form: ClassVar[str] = "parallel"
    attn_modules: ClassVar[None] = None
    prefix_gated: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.MAM
        check_adapter_args(self.reduction_factor, self.bottleneck_size, self.non_linearity, self.scaling,
                           self.adapter_dropout)
        self.ffn_modules = check_module_rules("ffn_modules", self.ffn_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        self.prefix_config()  # checks the prefix fields now, not at injection

    def prefix_config(self):
        return prefix_config_of(self)
