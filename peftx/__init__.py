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
# Weight-space methods (issue 7): AdaLoRA, (IA)^3, BitFit.
from peftx.tuners.adalora import AdaLoraConfig, AdaLoraLinear, AdaLoraModel
from peftx.tuners.bitfit import BitFitConfig, BitFitLayer, BitFitModel
from peftx.tuners.ia3 import IA3Config, IA3Linear, IA3Model
# prompt-learning methods
from peftx.tuners.multitask_prompt_tuning import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from peftx.tuners.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftx.tuners.prefix_tuning import PrefixTuningConfig
from peftx.tuners.prompt_learning import PromptLearningConfig
from peftx.tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit
# Bottleneck adapters, MAM, UniPELT (peftx only)
from peftx.tuners.bottleneck import AdapterConfig, BottleneckLayer
from peftx.tuners.mam import MAMConfig
from peftx.tuners.unipelt import GatedLoraLinear, UniPELTConfig
# LyCORIS methods (LoHa, LoKr)
from peftx.tuners.loha import LoHaConfig, LoHaConv2d, LoHaLinear
from peftx.tuners.lokr import LoKrConfig, LoKrConv2d, LoKrLinear
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
    "AdaLoraConfig", "AdaLoraLinear", "AdaLoraModel", "BitFitConfig", "BitFitLayer", "BitFitModel",
    "IA3Config", "IA3Linear", "IA3Model",
    # prompt-learning methods
    "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit", "PrefixTuningConfig", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit",
    # Bottleneck adapters, MAM, UniPELT (peftx only)
    "AdapterConfig", "BottleneckLayer", "GatedLoraLinear", "MAMConfig", "UniPELTConfig",
    # LyCORIS methods (LoHa, LoKr)
    "LoHaConfig", "LoHaConv2d", "LoHaLinear", "LoKrConfig", "LoKrConv2d", "LoKrLinear",
    "DoraMagnitude", "LoftQConfig",
]
