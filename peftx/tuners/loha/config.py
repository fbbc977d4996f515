"""LoHaConfig: HF PEFT's LoHa fields and names (adapter_config.json files move both ways)."""

from __future__ import annotations

from dataclasses import dataclass

from peftx.config import PeftType
from peftx.tuners.lycoris.config import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: ``delta W = (w1a w1b) * (w2a w2b) * alpha / r`` on Linear and Conv2d targets (fields: see
    LycorisConfig)."""

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LOHA
