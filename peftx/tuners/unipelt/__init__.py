from peftx.tuners.unipelt.config import UniPELTConfig
from peftx.tuners.unipelt.gated_lora import GatedLoraLinear
from peftx.tuners.unipelt.model import UniPELTModel

__all__ = ["GatedLoraLinear", "UniPELTConfig", "UniPELTModel"]
