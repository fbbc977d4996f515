"""peftx: parameter-efficient fine-tuning for PyTorch on fused C++/CUDA kernels."""

from peftx import _native  # noqa: F401  (loads peftx._C: registers the torch ops)
from peftx import optim
from peftx.quant.linear4bit import Linear4bit
from peftx.quant.matmul import nf4_matmul, nf4_matmul_t, nf4_quantize
from peftx.quant.nf4_weight import NF4Weight
from peftx.config import PeftConfig, TaskType
from peftx.mapping import (AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                           AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                           AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification,
                           get_peft_model)
from peftx.peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                              PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                              PeftModelForSequenceClassification, PeftModelForTokenClassification)
from peftx.quant.prepare import prepare_model_for_kbit_training, quantize_model
from peftx.tuners.lora import LoraEmbedding, LoraLinear, LoraLinear4bit
from peftx.tuners.lora.config import LoraConfig
# Weight-space LoRA variants (DoRA, PiSSA / OLoRA / LoftQ inits)
from peftx.tuners.lora.dora import DoraMagnitude
from peftx.tuners.lora.inits import LoftQConfig

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "Linear4bit", "LoraConfig", "LoraEmbedding", "LoraLinear", "LoraLinear4bit", "NF4Weight", "PeftConfig",
    "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "TaskType",
    "get_peft_model", "nf4_matmul", "nf4_matmul_t", "nf4_quantize", "prepare_model_for_kbit_training",
    "optim", "quantize_model",
    "DoraMagnitude", "LoftQConfig",
]
