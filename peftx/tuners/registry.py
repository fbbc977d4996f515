"""Which config class and which tuner class implement each ``peft_type``: the one table the
model-level API (PeftModel, get_peft_model, loading adapter files) looks methods up in. Each method's
package registers itself in ``peftx/tuners/__init__.py``."""

from __future__ import annotations

from dataclasses import dataclass

from peftx.config import PeftConfig


@dataclass(frozen=True)
class Method:
    config_cls: type
    tuner_cls: type | None  # None for prompt-learning methods (they wrap no module)


METHODS: dict[str, Method] = {}


def register_method(peft_type: str, config_cls: type, tuner_cls: type | None) -> None:
    key = getattr(peft_type, "value", peft_type)
    if key in METHODS:
        raise ValueError(f"peft_type {key!r} is registered twice")
    METHODS[key] = Method(config_cls, tuner_cls)


def method_of(config: PeftConfig) -> Method:
    key = getattr(config.peft_type, "value", config.peft_type)
    if key not in METHODS or not isinstance(config, METHODS[key].config_cls):
        raise TypeError(f"peft_config must be one of peftx's method configs ({', '.join(m.config_cls.__name__ for m in METHODS.values())}), "
                        f"got {type(config).__name__} with peft_type {key!r}")
    return METHODS[key]


def config_from_dict(data: dict) -> PeftConfig:
    peft_type = data.get("peft_type")
    if peft_type not in METHODS:
        raise ValueError(f"unknown peft_type {peft_type!r} in the adapter config; peftx loads {sorted(METHODS)}")
    return METHODS[peft_type].config_cls.from_dict(data)
