from peftx.tuners.lora.embedding import LoraEmbedding
from peftx.tuners.lora.layer import LoraLayer, LoraLinear, LoraLinear4bit

__all__ = ["LoraEmbedding", "LoraLayer", "LoraLinear", "LoraLinear4bit"]
