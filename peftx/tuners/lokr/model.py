"""LoKrModel: LoKr layers on a model's target modules (HF PEFT's default targets by architecture)."""

from __future__ import annotations

from torch import nn

from peftx.tuners.lokr.layer import LoKrConv2d, LoKrLayer, LoKrLinear
from peftx.tuners.lycoris.model import LycorisModel


class LoKrModel(LycorisModel):
    prefix = "lokr_"
    method = "LoKr"
    layer_types = (LoKrLayer,)
    layer_for = {nn.Linear: LoKrLinear, nn.Conv2d: LoKrConv2d}
