"""PrefixTuningConfig: prefix tuning (Li & Liang, 2021) with HF PEFT's fields and names. Without
``prefix_projection`` the trained table is the keys/values themselves (P-tuning v2's deep prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftx.config import PeftType
from peftx.tuners.prompt_learning.config import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    init_weights: str | None = field(default=None, metadata={
        "help": "None: random init; 'zero': the prefix keys/values start at zero."})
    encoder_hidden_size: int | None = field(default=None, metadata={
        "help": "Hidden size of the projection MLP; None: token_dim."})
    prefix_projection: bool = field(default=False, metadata={
        "help": "Compute the keys/values with a two-layer tanh MLP over virtual-token embeddings (Li & Liang); "
                "False: train the keys/values directly."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size!r}")

    def _fill_method_fields(self, model_cfg: dict) -> None:
        # Grouped-query attention: the cache holds num_key_value_heads heads of head_dim each (HF PEFT's rule).
        if model_cfg.get("num_key_value_heads") is not None:
            head_dim = model_cfg.get("head_dim") or self.token_dim // self.num_attention_heads
            self.token_dim = head_dim * model_cfg["num_key_value_heads"]
            self.num_attention_heads = model_cfg["num_key_value_heads"]
        if self.token_dim % self.num_attention_heads:
            raise ValueError(f"token_dim ({self.token_dim}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads}) for prefix tuning")
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim

    def build_encoder(self, word_embeddings):
        from peftx.tuners.prefix_tuning.encoder import PrefixEncoder
        return PrefixEncoder(self)
