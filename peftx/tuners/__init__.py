"""The PEFT methods, one package each; importing this registers them all (see registry.py)."""

from peftx.config import PeftType
from peftx.tuners.lora.config import LoraConfig
from peftx.tuners.lora.model import LoraModel
from peftx.tuners.registry import register_method

register_method(PeftType.LORA, LoraConfig, LoraModel)

# Bottleneck adapters (peftx only).
from peftx.tuners.bottleneck import AdapterConfig, BottleneckModel  # noqa: E402

register_method(PeftType.BOTTLENECK, AdapterConfig, BottleneckModel)
