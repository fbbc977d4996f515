"""AdapterConfig: bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021) in their sequential
and parallel (He et al. 2021) forms. peftx only: HF PEFT has no such method, so the files
(adapter_config.json with ``"peft_type": "BOTTLENECK"`` + adapter_model.safetensors) load in peftx only.

One adapter is ``f(h) = scaling * up(act(down(dropout(h))))`` with ``down: hidden -> bottleneck`` and
``up: bottleneck -> hidden``; ``up`` starts at zero (weight and bias), so the model is exactly the base
model at init. Where adapters go (``placement``) and what they read (``form``) is described in
peftx/tuners/bottleneck/placements.py, per architecture."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftx.config import PeftConfig, PeftType

PLACEMENTS = ("houlsby", "pfeiffer")
FORMS = ("sequential", "parallel")
NON_LINEARITIES = ("relu", "gelu", "swish", "silu", "tanh")


def check_module_rules(name: str, rules) -> dict[str, str | None] | None:
    """``attn_modules``/``ffn_modules``: None, a list of output-module suffixes, or a dict
    {output-module suffix: input-module suffix} (the input module is what parallel adapters read;
    with a list it is the output module's parent). Returns the dict form."""
    if rules is None:
        return None
    if isinstance(rules, str):
        rules = [rules]
    if isinstance(rules, (list, tuple)):
        rules = {r: None for r in rules}
    if not isinstance(rules, dict) or not rules or not all(isinstance(k, str) and k for k in rules):
        raise ValueError(f"{name} must be a non-empty list of module-name suffixes or a dict "
                         f"{{output module suffix: input module suffix}}, got {rules!r}")
    for k, v in rules.items():
        if v is not None and (not isinstance(v, str) or not v):
            raise ValueError(f"{name}[{k!r}]: the input module must be a module-name suffix, got {v!r}")
    return dict(rules)


def check_adapter_args(reduction_factor, bottleneck_size, non_linearity, scaling, adapter_dropout) -> None:
    if not isinstance(reduction_factor, (int, float)) or isinstance(reduction_factor, bool) or not reduction_factor > 0:
        raise ValueError(f"reduction_factor must be a positive number (bottleneck = hidden // reduction_factor, "
                         f"e.g. 16), got {reduction_factor!r}")
    if bottleneck_size is not None and (not isinstance(bottleneck_size, int) or isinstance(bottleneck_size, bool)
                                        or bottleneck_size <= 0):
        raise ValueError(f"bottleneck_size must be a positive integer or None (then hidden // reduction_factor), "
                         f"got {bottleneck_size!r}")
    if non_linearity not in NON_LINEARITIES:
        raise ValueError(f"non_linearity must be one of {list(NON_LINEARITIES)}, got {non_linearity!r}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise ValueError(f"scaling must be a number, got {scaling!r}")
    if not isinstance(adapter_dropout, (int, float)) or not 0.0 <= adapter_dropout < 1.0:
        raise ValueError(f"adapter_dropout must be in [0, 1), got {adapter_dropout!r}")


@dataclass
class AdapterConfig(PeftConfig):
    placement: str = field(default="houlsby", metadata={
        "help": "'houlsby': an adapter after the attention output and one after the feed-forward (and after "
                "cross-attention in encoder-decoder models); 'pfeiffer': after the feed-forward only."})
    form: str = field(default="sequential", metadata={
        "help": "'sequential': h + f(h) on the sublayer's output h, before the residual add; 'parallel': "
                "f(x) of the sublayer's input x added to its output (He et al. 2021)."})
    reduction_factor: float = field(default=16, metadata={
        "help": "bottleneck = hidden // reduction_factor (ignored when bottleneck_size is set)."})
    bottleneck_size: int | None = field(default=None, metadata={"help": "The bottleneck width, if set."})
    non_linearity: str = field(default="relu", metadata={"help": "relu, gelu, swish (= silu), silu or tanh."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplies the adapter's output."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    attn_modules: list[str] | dict[str, str] | None = field(default=None, metadata={
        "help": "Attention output projections to adapt (name suffixes; a dict maps each to the sublayer-input "
                "module parallel adapters read). None: peftx's table for the model's architecture."})
    ffn_modules: list[str] | dict[str, str] | None = field(default=None, metadata={
        "help": "Feed-forward output projections to adapt (same form as attn_modules)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only these layer indices (as found in module names such as 'layers.3.')."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK
        self.validate_adapter_fields()

    def validate_adapter_fields(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {list(FORMS)}, got {self.form!r}")
        check_adapter_args(self.reduction_factor, self.bottleneck_size, self.non_linearity, self.scaling,
                           self.adapter_dropout)
        self.attn_modules = check_module_rules("attn_modules", self.attn_modules)
        self.ffn_modules = check_module_rules("ffn_modules", self.ffn_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]

