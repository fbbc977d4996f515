from peftx.tuners.lokr.config import LoKrConfig
from peftx.tuners.lokr.layer import LoKrConv2d, LoKrLayer, LoKrLinear, factorization
from peftx.tuners.lokr.model import LoKrModel

__all__ = ["LoKrConfig", "LoKrConv2d", "LoKrLayer", "LoKrLinear", "LoKrModel", "factorization"]
