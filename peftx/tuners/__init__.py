"""The PEFT methods, one package each; importing this registers them all (see registry.py)."""

from peftx.config import PeftType
from peftx.tuners.adalora.config import AdaLoraConfig
from peftx.tuners.adalora.model import AdaLoraModel
from peftx.tuners.bitfit.config import BitFitConfig
from peftx.tuners.bitfit.model import BitFitModel
from peftx.tuners.ia3.config import IA3Config
from peftx.tuners.ia3.model import IA3Model
from peftx.tuners.loha import LoHaConfig, LoHaModel
from peftx.tuners.lokr import LoKrConfig, LoKrModel
from peftx.tuners.lora.config import LoraConfig
from peftx.tuners.lora.model import LoraModel
from peftx.tuners.registry import register_method

register_method(PeftType.LORA, LoraConfig, LoraModel)
register_method(PeftType.ADALORA, AdaLoraConfig, AdaLoraModel)
register_method(PeftType.IA3, IA3Config, IA3Model)
register_method(PeftType.BITFIT, BitFitConfig, BitFitModel)
register_method(PeftType.LOHA, LoHaConfig, LoHaModel)
register_method(PeftType.LOKR, LoKrConfig, LoKrModel)

# Prompt-learning methods wrap no module (tuner_cls None): peftx/prompt_model.py drives them.
from peftx.tuners.multitask_prompt_tuning.config import MultitaskPromptTuningConfig  # noqa: E402
from peftx.tuners.p_tuning.config import PromptEncoderConfig  # noqa: E402
from peftx.tuners.prefix_tuning.config import PrefixTuningConfig  # noqa: E402
from peftx.tuners.prompt_tuning.config import PromptTuningConfig  # noqa: E402

register_method(PeftType.PROMPT_TUNING, PromptTuningConfig, None)
register_method(PeftType.P_TUNING, PromptEncoderConfig, None)
register_method(PeftType.PREFIX_TUNING, PrefixTuningConfig, None)
register_method(PeftType.MULTITASK_PROMPT_TUNING, MultitaskPromptTuningConfig, None)

# Bottleneck adapters, and their compositions with prefix tuning (peftx only).
from peftx.tuners.bottleneck import AdapterConfig, BottleneckModel  # noqa: E402
from peftx.tuners.mam import MAMConfig, MAMModel  # noqa: E402
from peftx.tuners.unipelt import UniPELTConfig, UniPELTModel  # noqa: E402

register_method(PeftType.BOTTLENECK, AdapterConfig, BottleneckModel)
register_method(PeftType.MAM, MAMConfig, MAMModel)
register_method(PeftType.UNIPELT, UniPELTConfig, UniPELTModel)
