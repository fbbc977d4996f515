"""LoHaModel: LoHa layers on a model's target modules (HF PEFT's default targets by architecture)."""

from __future__ import annotations

from torch import nn

from peftx.tuners.loha.layer import LoHaConv2d, LoHaLayer, LoHaLinear
from peftx.tuners.lycoris.model import LycorisModel


class LoHaModel(LycorisModel):
    prefix = "hada_"
    method = "LoHa"
    layer_types = (LoHaLayer,)
    layer_for = {nn.Linear: LoHaLinear, nn.Conv2d: LoHaConv2d}
