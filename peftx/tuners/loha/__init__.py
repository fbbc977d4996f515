from peftx.tuners.loha.config import LoHaConfig
from peftx.tuners.loha.layer import LoHaConv2d, LoHaLayer, LoHaLinear
from peftx.tuners.loha.model import LoHaModel

__all__ = ["LoHaConfig", "LoHaConv2d", "LoHaLayer", "LoHaLinear", "LoHaModel"]
