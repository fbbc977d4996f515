"""The PEFT methods, one package each; importing this registers them all (see registry.py)."""

from peftx.config import PeftType
from peftx.tuners.loha import LoHaConfig, LoHaModel
from peftx.tuners.lokr import LoKrConfig, LoKrModel
from peftx.tuners.lora.config import LoraConfig
from peftx.tuners.lora.model import LoraModel
from peftx.tuners.registry import register_method

register_method(PeftType.LORA, LoraConfig, LoraModel)
register_method(PeftType.LOHA, LoHaConfig, LoHaModel)
register_method(PeftType.LOKR, LoKrConfig, LoKrModel)
