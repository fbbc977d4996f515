"""MAMModel: the tuner part of MAM (parallel FFN adapters); the prefix part lives in the PeftModel
(peftx/composed_model.py)."""

from peftx.tuners.bottleneck.model import BottleneckModel


class MAMModel(BottleneckModel):
    pass
