from peftx.tuners.bottleneck.config import AdapterConfig
from peftx.tuners.bottleneck.layer import BottleneckLayer
from peftx.tuners.bottleneck.model import BottleneckModel
from peftx.tuners.bottleneck.placements import PLACEMENT_TABLE

__all__ = ["AdapterConfig", "BottleneckLayer", "BottleneckModel", "PLACEMENT_TABLE"]
