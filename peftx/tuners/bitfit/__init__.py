from peftx.tuners.bitfit.config import BitFitConfig
from peftx.tuners.bitfit.layer import BitFitLayer
from peftx.tuners.bitfit.model import BitFitModel

__all__ = ["BitFitConfig", "BitFitLayer", "BitFitModel"]
