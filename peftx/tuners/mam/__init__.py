from peftx.tuners.mam.config import MAMConfig
from peftx.tuners.mam.model import MAMModel

__all__ = ["MAMConfig", "MAMModel"]
