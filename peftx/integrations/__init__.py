"""Integrations with other libraries, imported on first use (``peftx`` itself does not need them):
``PeftxTrainer`` / ``PeftxTrainerMixin`` for transformers' ``Trainer`` (peftx/integrations/trainer.py)."""

_LAZY = {"PeftxTrainer", "PeftxTrainerMixin", "check_checkpoint_layout", "load_adapters_from_checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        from peftx.integrations import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'peftx.integrations' has no attribute {name!r}")


__all__ = sorted(_LAZY)
