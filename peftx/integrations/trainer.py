"""transformers ``Trainer`` support for peftx models.

``Trainer`` special-cases ``peft.PeftModel`` by ``isinstance``: for any other module it writes the
whole state dict (the frozen and 4-bit base included) to ``model.safetensors`` at every checkpoint,
reads the model's own ``forward(*args, **kwargs)`` signature to decide which dataset columns and
label names exist (so ``remove_unused_columns`` would drop ``input_ids``), and names the model by its
class to decide whether label smoothing shifts the labels. ``PeftxTrainerMixin`` gives a peftx
``PeftModel`` the treatment HF PEFT models get:

- checkpoints and ``save_model`` hold only the adapters (``adapter_model.safetensors`` and
  ``adapter_config.json``, HF PEFT's format, non-default adapters in sub-folders);
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` load those adapters back in place, after
  checking that the checkpoint's adapter layout is the model's (a clear error otherwise);
- dataset columns, label names, ``return_loss`` and label smoothing follow the wrapped base model.

Everything else (optimizer and scheduler state, RNG state, data order) is the Trainer's own, so a
resumed run continues the interrupted one exactly. Models that are not peftx models are handled by
the Trainer unchanged. Mix it into a Trainer subclass (``class T(PeftxTrainerMixin, SFTTrainer)``)
or use ``PeftxTrainer``.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
import transformers
from transformers.trainer_pt_utils import LabelSmoother
from transformers.utils import can_return_loss, find_labels

from peftx.config import PeftConfig
from peftx.peft_model import PeftModel, config_from_dict
from peftx.save_load import WEIGHTS_NAME, load_tensors

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"
# Fields of an adapter config that do not change what is trained or how.
_NOT_LAYOUT = ("inference_mode", "base_model_name_or_path", "revision")


def _adapter_dir(checkpoint: str | os.PathLike, adapter_name: str) -> str:
    return os.fspath(checkpoint) if adapter_name == "default" else os.path.join(checkpoint, adapter_name)


def _is_causal_lm(model: torch.nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _layout(config: PeftConfig) -> dict:
    """The config's fields, with name lists compared as sets (their order does not matter)."""
    out = config.to_dict()
    for k in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(out.get(k), list):
            out[k] = sorted(out[k])
    return out


def check_checkpoint_layout(model: PeftModel, checkpoint: str | os.PathLike) -> None:
    """Raises ``ValueError`` unless ``checkpoint`` holds every adapter of ``model`` with the same config
    (rank, alpha, targets, dropout, ...; not ``inference_mode`` or the base model's name)."""
    checkpoint = os.fspath(checkpoint)
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"resume_from_checkpoint: {checkpoint!r} is not a directory")
    for name, config in model.peft_config.items():
        directory = _adapter_dir(checkpoint, name)
        if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            full = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(checkpoint, n))]
            hint = (f" (it holds {full[0]}: a whole-model checkpoint, as a plain transformers.Trainer writes for a "
                    "peftx model; resume with the Trainer that wrote it)") if full else ""
            raise ValueError(f"checkpoint {checkpoint!r} has no {WEIGHTS_NAME} for adapter {name!r} in "
                             f"{directory!r}{hint}")
        theirs = _layout(config_from_dict(PeftConfig.read_dict(directory)))
        ours = _layout(config)
        diff = sorted(k for k in set(ours) | set(theirs)
                      if k not in _NOT_LAYOUT and ours.get(k) != theirs.get(k))
        if diff:
            detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, model {ours.get(k)!r}" for k in diff)
            raise ValueError(f"checkpoint {checkpoint!r} holds adapter {name!r} with another layout than the model's "
                             f"({detail}); resume with the same LoraConfig, or start a new run")


def load_adapters_from_checkpoint(model: PeftModel, checkpoint: str | os.PathLike) -> None:
    """Copies every adapter of ``model`` from a checkpoint written by ``PeftxTrainer`` (or
    ``PeftModel.save_pretrained``), in place, keeping each adapter's trainable state."""
    check_checkpoint_layout(model, checkpoint)
    for name in model.peft_config:
        directory = _adapter_dir(checkpoint, name)
        model._load_adapter_tensors(load_tensors(directory), name, directory)


class _ShiftingLabelSmoother(LabelSmoother):
    """Label smoothing that shifts the labels, as the Trainer does for the causal LMs it recognizes."""

    def __call__(self, model_output, labels, shift_labels=False, **kwargs):
        return super().__call__(model_output, labels, shift_labels=True, **kwargs)


class PeftxTrainerMixin:
    """Put before ``transformers.Trainer`` (or a subclass of it) in the bases; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self._is_peftx():
            return
        base_cls = self.model.get_base_model().__class__
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)
        if self.label_smoother is not None and _is_causal_lm(self.model.get_base_model()):
            self.label_smoother = _ShiftingLabelSmoother(epsilon=self.label_smoother.epsilon,
                                                         ignore_index=self.label_smoother.ignore_index)

    def _is_peftx(self) -> bool:
        return isinstance(self.model, PeftModel)

    def _set_signature_columns_if_needed(self) -> None:
        if self._is_peftx() and self._signature_columns is None:
            columns = list(inspect.signature(self.model.get_base_model().forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._is_peftx():
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None:
            logger.warning("PeftxTrainer: the state_dict passed to _save is ignored; the adapters are saved from "
                           "the model (DeepSpeed ZeRO-3 and FSDP sharding are not supported)")
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving the adapters (only) to %s", output_dir)
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(target, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading the adapters from %s", resume_from_checkpoint)
        load_adapters_from_checkpoint(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self._is_peftx():
            return super()._load_best_model()
        logger.info("Loading the best adapters from %s (score: %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_adapters_from_checkpoint(self.model, self.state.best_model_checkpoint)


class PeftxTrainer(PeftxTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that saves and resumes peftx models as adapters only."""


__all__ = ["PeftxTrainer", "PeftxTrainerMixin", "check_checkpoint_layout",
           "load_adapters_from_checkpoint"]
