"""get_peft_model and the AutoPeftModelFor<Task> loaders."""

from __future__ import annotations

import os

from torch import nn

from peftx.config import PeftConfig, TaskType
from peftx.peft_model import TASK_CLASSES, PeftModel, config_from_dict


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wraps ``model`` with a new adapter; the PeftModel subclass follows ``peft_config.task_type``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cls = TASK_CLASSES.get(TaskType(peft_config.task_type), PeftModel) if peft_config.task_type else PeftModel
    return cls(model, peft_config, adapter_name)


class _AutoPeftModel:
    _task: TaskType
    _auto_class: str

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
                        base_model: nn.Module | None = None, **kwargs) -> PeftModel:
        """Loads the base model named in the adapter config (a local path: no downloads) with
        transformers' Auto class, then the adapter."""
        config = config_from_dict(PeftConfig.read_dict(model_id))
        if base_model is None:
            import transformers
            path = config.base_model_name_or_path
            if not path:
                raise ValueError(f"the adapter config in {os.fspath(model_id)!r} names no base_model_name_or_path; "
                                 "pass base_model=")
            base_model = getattr(transformers, cls._auto_class).from_pretrained(path, **kwargs)
        return TASK_CLASSES[cls._task].from_pretrained(base_model, model_id, adapter_name=adapter_name,
                                                       is_trainable=is_trainable, config=config)


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _task, _auto_class = TaskType.CAUSAL_LM, "AutoModelForCausalLM"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    _task, _auto_class = TaskType.SEQ_2_SEQ_LM, "AutoModelForSeq2SeqLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _task, _auto_class = TaskType.SEQ_CLS, "AutoModelForSequenceClassification"


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    _task, _auto_class = TaskType.TOKEN_CLS, "AutoModelForTokenClassification"


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    _task, _auto_class = TaskType.QUESTION_ANS, "AutoModelForQuestionAnswering"


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    _task, _auto_class = TaskType.FEATURE_EXTRACTION, "AutoModel"
