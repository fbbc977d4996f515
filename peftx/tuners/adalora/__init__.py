from peftx.tuners.adalora.config import AdaLoraConfig
from peftx.tuners.adalora.layer import AdaLoraLinear
from peftx.tuners.adalora.model import AdaLoraModel
from peftx.tuners.adalora.rank_allocator import RankAllocator

__all__ = ["AdaLoraConfig", "AdaLoraLinear", "AdaLoraModel", "RankAllocator"]
