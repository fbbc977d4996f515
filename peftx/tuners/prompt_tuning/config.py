"""PromptTuningConfig: HF PEFT's prompt-tuning fields and names."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peftx.config import PeftType
from peftx.tuners.prompt_learning.config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    prompt_tuning_init: PromptTuningInit | str = field(default=PromptTuningInit.RANDOM, metadata={
        "help": "RANDOM: N(0, 1) soft tokens; SAMPLE_VOCAB: embeddings of random vocabulary tokens; TEXT: the "
                "embeddings of prompt_tuning_init_text's tokens (truncated to the virtual tokens, or repeated "
                "until they fill them)."})
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "The text for TEXT init."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "A local tokenizer directory (or hub name, if the environment allows) for TEXT init."})
    tokenizer_kwargs: dict | None = field(default=None, metadata={
        "help": "Keyword arguments for AutoTokenizer.from_pretrained (TEXT init only; trust_remote_code is dropped)."})

    _init_enum = PromptTuningInit

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = self._peft_type()
        try:
            self.prompt_tuning_init = self._init_enum(self.prompt_tuning_init)
        except ValueError:
            raise ValueError(f"prompt_tuning_init must be one of {[e.value for e in self._init_enum]}, "
                             f"got {self.prompt_tuning_init!r}") from None
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer that turns "
                                 "prompt_tuning_init_text into token ids)")
            if not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (a non-empty string), got "
                                 f"{self.prompt_tuning_init_text!r}")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")

    def _peft_type(self):
        return PeftType.PROMPT_TUNING

    def build_encoder(self, word_embeddings):
        from peftx.tuners.prompt_tuning.encoder import PromptEmbedding
        return PromptEmbedding(self, word_embeddings)
