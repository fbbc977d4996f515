"""The PEFT methods, one package each; importing this registers them all (see registry.py)."""

from peftx.config import PeftType
from peftx.tuners.adalora.config import AdaLoraConfig
from peftx.tuners.adalora.model import AdaLoraModel
from peftx.tuners.bitfit.config import BitFitConfig
from peftx.tuners.bitfit.model import BitFitModel
from peftx.tuners.ia3.config import IA3Config
from peftx.tuners.ia3.model import IA3Model
from peftx.tuners.lora.config import LoraConfig
from peftx.tuners.lora.model import LoraModel
from peftx.tuners.registry import register_method

register_method(PeftType.LORA, LoraConfig, LoraModel)
register_method(PeftType.ADALORA, AdaLoraConfig, AdaLoraModel)
register_method(PeftType.IA3, IA3Config, IA3Model)
register_method(PeftType.BITFIT, BitFitConfig, BitFitModel)
