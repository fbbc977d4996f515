"""PeftModel and its task subclasses: the model-level API of HF PEFT (same attribute layout
``base_model.model.…``, same state-dict keys, same file format), over any registered method's tuner
(peftx/tuners/registry.py)."""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

import peftx.tuners  # noqa: F401  (registers every method)
from peftx.composed_model import ComposedPrefixMixin, is_composed
from peftx.config import PeftConfig, TaskType
from peftx.prompt_model import PromptLearningMixin
from peftx.save_load import adapter_state_dict, load_tensors, save_tensors_atomic, to_model_key
from peftx.tuners.lora.embedding import LoraEmbedding
from peftx.tuners.lora.layer import LoraLayer
from peftx.tuners.registry import config_from_dict, method_of
from peftx.tuners.targets import ADAPTER_PREFIXES
from peftx.utils_modules import ModulesToSaveWrapper, get_parent
from peftx.quant.linear4bit import Linear4bit

logger = logging.getLogger(__name__)

__all__ = ["PeftModel", "TASK_CLASSES", "check_adapter_name", "config_from_dict"]


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    prefixes = sorted(p.rstrip("_") for p in ADAPTER_PREFIXES)
    if name.startswith(tuple(prefixes)) or name in ("base_layer", "original_module", "modules_to_save"):
        raise ValueError(f"adapter_name {name!r} collides with an adapter module prefix or attribute "
                         f"(names starting with {prefixes}, 'base_layer', 'original_module', "
                         "'modules_to_save'); pick another name")


class PeftModel(PromptLearningMixin, ComposedPrefixMixin, nn.Module):
    """A base model with named adapters. ``forward``/``generate`` pass through to the base model (for
    prompt-learning methods, peftx/prompt_model.py: ``base_model`` is the model itself and the adapters
    live in ``prompt_encoder``; for methods composing a tuner with prefix tuning (MAM, UniPELT),
    peftx/composed_model.py: the prefix of each adapter lives in ``prefix_part``)."""

    _task_heads: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        check_adapter_name(adapter_name)
        method = method_of(peft_config)
        self.peft_type = peft_config.peft_type
        self.peft_config: dict[str, PeftConfig] = {adapter_name: peft_config}
        self.active_adapter = adapter_name
        self.modules_to_save: set[str] = set()
        self._wrapper_names: list[str] = []
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
        self._prompt_learning = peft_config.is_prompt_learning
        if self._prompt_learning:
            self._init_prompt_learning(model, peft_config, adapter_name)
        else:
            self.base_model = method.tuner_cls(model, self.peft_config, adapter_name,
                                               skip=self._heads_to_save(model, peft_config))
            if is_composed(peft_config):
                self._add_prefix_part(adapter_name, peft_config)
        self._set_modules_to_save(adapter_name)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- modules_to_save ---------------------------------------------------------------------------
    def _heads_to_save(self, model: nn.Module, config) -> list[str]:
        """modules_to_save plus the task's head (classifier/score, qa_outputs) where the model has one."""
        wanted = list(config.modules_to_save or [])
        heads = [h for h in self._task_heads if any(n.split(".")[-1] == h for n, _ in model.named_modules())]
        for h in heads:
            if h not in wanted:
                wanted.append(h)
        if heads and config.modules_to_save is None:
            config.modules_to_save = heads
        return wanted

    def _set_modules_to_save(self, adapter_name: str) -> None:
        root = self.get_base_model()
        wanted = self._heads_to_save(root, self.peft_config[adapter_name])
        self.modules_to_save |= set(wanted)
        for name, module in list(root.named_modules()):
            if not name or any(p in ("modules_to_save", "original_module") for p in name.split(".")):
                continue
            if not any(name == t or name.endswith("." + t) for t in wanted):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                parent, child = get_parent(root, name)
                setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
            if name not in self._wrapper_names:
                self._wrapper_names.append(name)
        if self._prompt_learning:
            self._set_wrappers_adapter(self.active_adapter)
        else:
            self.base_model.set_adapter(self.active_adapter)

    def _set_wrappers_adapter(self, adapter_name: str) -> None:
        for m in self.get_base_model().modules():
            if isinstance(m, ModulesToSaveWrapper):
                m.set_adapter(adapter_name)
                if self.peft_config[adapter_name].inference_mode and adapter_name in m.modules_to_save:
                    m.modules_to_save[adapter_name].requires_grad_(False)

    @property
    def _wrapper_prefixes(self) -> list[str]:
        root = "base_model." if self._prompt_learning else "base_model.model."
        return [f"{root}{n}" for n in self._wrapper_names]

    # --- forward -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _adapter_names_hooks(self, adapter_names):
        if adapter_names is None:
            yield
            return
        if len(adapter_names) and not all(isinstance(n, str) for n in adapter_names):
            raise ValueError("adapter_names must be a list of adapter names (one per sample)")
        handles = []

        def hook(_module, args, kwargs):
            kwargs["adapter_names"] = adapter_names
            return args, kwargs
        for m in self.modules():
            if isinstance(m, (LoraLayer, LoraEmbedding)):
                handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        if not handles:
            raise ValueError(f"adapter_names (a mixed-adapter batch) is not supported by "
                             f"{getattr(self.peft_type, 'value', self.peft_type)} adapters; set_adapter() one adapter "
                             "per batch")
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if self._prompt_learning:
            self._no_adapter_names(adapter_names)
            if getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False):
                return self._prompt_forward_seq2seq(*args, **kwargs)
            return self._prompt_forward(*args, **kwargs)
        if "prefix_part" in self._modules:
            kwargs, args = self._with_prefix(args, kwargs), ()
        with self._adapter_names_hooks(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if self._prompt_learning:
            self._no_adapter_names(adapter_names)
            return self._prompt_generate(*args, **kwargs)
        if "prefix_part" in self._modules:
            return self._generate_with_prefix(args, kwargs)
        with self._adapter_names_hooks(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    @staticmethod
    def _no_adapter_names(adapter_names) -> None:
        if adapter_names is not None:
            raise ValueError("adapter_names (a mixed-adapter batch) is not supported by prompt-learning methods; "
                             "set_adapter() one adapter per batch")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the context, the model computes as the base model."""
        if self._prompt_learning:
            with self._prompt_disabled_context():
                yield
            return
        self.base_model.enable_adapter_layers(False)
        self._prefix_disabled = True
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers(True)
            self._prefix_disabled = False

    # --- adapters ---------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} already exists; delete_adapter() it first")
        method_of(peft_config)
        if peft_config.peft_type != self.peft_type:
            raise ValueError(f"peft_config: this model's adapters are {getattr(self.peft_type, 'value', self.peft_type)}; "
                             f"an adapter of type {getattr(peft_config.peft_type, 'value', peft_config.peft_type)} "
                             "cannot be added to it (one method per PeftModel, as HF PEFT)")
        self.peft_config[adapter_name] = peft_config
        if self._prompt_learning:
            try:
                self._add_prompt_encoder(adapter_name, peft_config)
            except Exception:
                del self.peft_config[adapter_name]
                raise
            self._set_modules_to_save(adapter_name)
            return
        try:
            self.base_model.inject_adapter(adapter_name, skip=set(self._heads_to_save(self.base_model.model, peft_config))
                                           | set(self.modules_to_save))
        except Exception:
            del self.peft_config[adapter_name]
            raise
        if is_composed(peft_config):
            try:
                self._add_prefix_part(adapter_name, peft_config)
            except Exception:
                self.base_model.delete_adapter(adapter_name)
                raise
        self._set_modules_to_save(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        if self._prompt_learning:
            self._set_wrappers_adapter(adapter_name)
        else:
            self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if self._prompt_learning:
            if adapter_name not in self.peft_config:
                raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; this model has "
                                 f"{sorted(self.peft_config)}")
            self._prompt_delete(adapter_name)
        else:
            self.base_model.delete_adapter(adapter_name)
            self._delete_prefix_part(adapter_name)
        if self.active_adapter == adapter_name:
            remaining = sorted(self.peft_config)
            self.active_adapter = remaining[0] if remaining else None
            if remaining:
                self.set_adapter(remaining[0])

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None):
        check_adapter_name(adapter_name)
        if self._prompt_learning or not hasattr(self.base_model, "add_weighted_adapter"):
            raise ValueError(f"add_weighted_adapter is not supported for {type(self.base_model).__name__} adapters")
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank)

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        if self._prompt_learning:
            raise ValueError("prompt-learning adapters (virtual tokens) cannot be merged into the base weights; "
                             "use the PeftModel, or unload() for the plain base model")
        return self.base_model.merge_and_unload(adapter_names)

    def unload(self) -> nn.Module:
        if self._prompt_learning:
            return self._prompt_unload()
        return self.base_model.unload()

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._prompt_learning else self.base_model.model

    # --- parameter counts --------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) as HF PEFT counts them: a 4-bit weight counts its unpacked element count."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        for m in self.modules():
            if isinstance(m, Linear4bit):
                w = m.weight
                total += w.packed.numel() * 2  # two 4-bit values per stored byte, as HF PEFT counts Params4bit
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- save / load -------------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors saved for one adapter, keyed as in HF PEFT's files (its get_peft_model_state_dict)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        if name not in self.peft_config:
            raise ValueError(f"adapter_name: unknown adapter {name!r}; this model has {sorted(self.peft_config)}")
        config = self.peft_config[name]
        if self._prompt_learning:
            return self._prompt_state_dict(name)
        tensors = adapter_state_dict(self, name, self.base_model.prefix,
                                     lambda k: self.base_model.extra_saved_keys(k, config), self._wrapper_prefixes)
        tensors = self.base_model.to_file_tensors(tensors, name)
        return {**{self.base_model.file_key(k): v for k, v in tensors.items()}, **self._prefix_state_dict(name)}

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        **kwargs) -> None:
        """Writes each adapter (only the adapter) in HF PEFT's format; non-default adapters go to
        sub-folders named after them. Files are replaced atomically."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"selected_adapters: unknown adapter {n!r}; this model has {sorted(self.peft_config)}")
        for n in names:
            config = self.peft_config[n]
            out_dir = save_directory if n == "default" else os.path.join(save_directory, n)
            tensors = self.get_adapter_state_dict(n)
            save_tensors_atomic(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
            inference_mode = config.inference_mode
            config.inference_mode = True
            try:
                config.save_pretrained(out_dir)
            finally:
                config.inference_mode = inference_mode

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **kwargs) -> "PeftModel":
        """Loads a peftx or HF PEFT adapter directory onto ``model`` (safetensors only)."""
        if config is None:
            config = config_from_dict(PeftConfig.read_dict(model_id))
        config.inference_mode = not is_trainable
        if cls is PeftModel and config.task_type is not None:
            cls = TASK_CLASSES.get(TaskType(config.task_type), PeftModel)
        tensors = load_tensors(model_id)
        peft_model = cls(model, config, adapter_name)
        peft_model._load_adapter_tensors(tensors, adapter_name, model_id)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **kwargs) -> None:
        config = config_from_dict(PeftConfig.read_dict(model_id))
        config.inference_mode = not is_trainable
        tensors = load_tensors(model_id)
        self.add_adapter(adapter_name, config)
        try:
            self._load_adapter_tensors(tensors, adapter_name, model_id)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.base_model.set_adapter(self.active_adapter)

    def _load_adapter_tensors(self, tensors: dict[str, torch.Tensor], adapter_name: str, source) -> None:
        if self._prompt_learning:
            self._prompt_load(tensors, adapter_name, source)
            return
        tensors = self._split_prefix_tensors(tensors, adapter_name, source)
        self.base_model.before_loading_tensors(adapter_name)
        own = self.state_dict(keep_vars=True)
        prefixes = self._wrapper_prefixes
        mapped = {}
        unexpected = []
        for key, value in tensors.items():
            target = to_model_key(self.base_model.key_from_file(key), adapter_name, self.base_model.prefix, prefixes)
            if target not in own:
                unexpected.append(key)
                continue
            if tuple(own[target].shape) != tuple(value.shape):
                raise ValueError(f"adapter tensor {key!r} in {os.fspath(source)!r} has shape {tuple(value.shape)} but "
                                 f"the model's {target!r} has shape {tuple(own[target].shape)}: the adapter was "
                                 "trained for a different architecture or configuration")
            mapped[target] = value
        if unexpected:
            raise ValueError(f"adapter {os.fspath(source)!r} has tensors with no place in this model "
                             f"({len(unexpected)}, e.g. {unexpected[:3]}): it was trained for another architecture "
                             "or other target_modules")
        missing = [k for k in own if (self.base_model.is_adapter_key(k, adapter_name)
                                      or f".modules_to_save.{adapter_name}." in k) and k not in mapped]
        if missing:
            raise ValueError(f"adapter {os.fspath(source)!r} lacks {len(missing)} tensors this model expects "
                             f"(e.g. {missing[:3]}); the file is incomplete or for other target_modules")
        with torch.no_grad():
            for k, v in mapped.items():
                own[k].copy_(v.to(own[k].dtype))


class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class PeftModelForSequenceClassification(PeftModel):
    _task_heads = ("classifier", "score")
    _labels_per_token = False


class PeftModelForTokenClassification(PeftModel):
    _task_heads = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    _task_heads = ("qa_outputs",)
    _labels_per_token = False


class PeftModelForFeatureExtraction(PeftModel):
    pass


TASK_CLASSES = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
