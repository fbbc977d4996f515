"""PromptLearningConfig: the fields every prompt-learning method shares (HF PEFT's names), and the
inference of the model's dimensions from its transformers config."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftx.config import PeftConfig, TaskType


def _first(cfg: dict, keys: tuple[str, ...]):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


@dataclass
class PromptLearningConfig(PeftConfig):
    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens (per transformer stack)."})
    token_dim: int | None = field(default=None, metadata={
        "help": "Hidden size of the base model; None: read from the model config."})
    num_transformer_submodules: int | None = field(default=None, metadata={
        "help": "1 for decoder-only/encoder-only models, 2 for encoder-decoder; None: 2 for SEQ_2_SEQ_LM, else 1."})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "Attention heads (key/value heads for prefix tuning on GQA models); None: from the model config."})
    num_layers: int | None = field(default=None, metadata={"help": "Transformer layers; None: from the model config."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. a classifier head)."})

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"num_transformer_submodules must be 1, 2 or None, got {self.num_transformer_submodules!r}")

    def fill_from_model(self, model) -> None:
        """Sets the None dimensions from the model's transformers config, as HF PEFT infers them (so the
        saved adapter_config.json is the same)."""
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1
        mc = getattr(model, "config", None)
        cfg = mc.to_dict() if hasattr(mc, "to_dict") else dict(mc or {})
        if "text_config" in cfg and isinstance(cfg["text_config"], dict):
            cfg = cfg["text_config"]
        if self.num_layers is None:
            self.num_layers = getattr(mc, "num_hidden_layers", None) or _first(cfg, ("num_hidden_layers", "num_layers",
                                                                                     "n_layer"))
        if self.token_dim is None:
            self.token_dim = _first(cfg, ("hidden_size", "n_embd", "d_model"))
        if self.num_attention_heads is None:
            self.num_attention_heads = _first(cfg, ("num_attention_heads", "n_head", "num_heads",
                                                    "encoder_attention_heads"))
        missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{type(self).__name__}: could not read {missing} from the model's config "
                             f"({type(model).__name__} has {'no config' if mc is None else 'no such fields'}); "
                             f"set {', '.join(f'{m}=' for m in missing)} in the config")
        self._fill_method_fields(cfg)

    def _fill_method_fields(self, model_cfg: dict) -> None:
        pass
