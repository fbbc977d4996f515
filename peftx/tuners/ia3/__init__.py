from peftx.tuners.ia3.config import IA3Config
from peftx.tuners.ia3.layer import IA3Linear
from peftx.tuners.ia3.model import IA3Model

__all__ = ["IA3Config", "IA3Linear", "IA3Model"]
