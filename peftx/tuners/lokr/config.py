"""LoKrConfig: HF PEFT's LoKr fields and names (adapter_config.json files move both ways)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peftx.config import PeftType
from peftx.tuners.lycoris.config import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr: ``delta W = kron(W1, W2) * alpha / r`` on Linear and Conv2d targets, the dimensions split
    into two factors each (``factorization``); W1 and W2 full or rank-r products."""

    decompose_both: bool = field(default=False, metadata={
        "help": "Also factor W1 as w1_a @ w1_b (rank r) when r < max(W1's dims) / 2."})
    decompose_factor: int = field(default=-1, metadata={
        "help": "Split each dimension n as (f, n / f) for this f when it divides n; -1: the divisor pair "
                "closest to sqrt(n)."})
    rank_dropout_scale: bool = field(default=False, metadata={
        "help": "Rescale the rows kept by rank_dropout by 1 / their mean."})

    _init_choices: ClassVar[tuple] = (True, False, "lycoris")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.LOKR
        if not isinstance(self.decompose_factor, int) or isinstance(self.decompose_factor, bool):
            raise ValueError(f"decompose_factor must be an integer (-1: near sqrt), got {self.decompose_factor!r}")
