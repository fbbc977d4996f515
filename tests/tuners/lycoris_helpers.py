"""Shared by the LoHa and LoKr tests: a small conv model (Conv2d 3x3, 1x1, grouped strided, and a
Linear head) that returns ``.logits`` like the transformers models, and layer-level twins of HF
PEFT's layers with the same factor values."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

CONV_TARGETS = ["conv1", "conv2", "conv3", "head"]


@dataclass
class Out:
    logits: torch.Tensor


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, groups=2)
        self.head = nn.Linear(16 * 3 * 3, 10)

    def forward(self, pixel_values):
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return Out(self.head(h.flatten(1)))


def make_conv(seed: int = 0):
    """(model, inputs, task_type) like tests.integration.tiny_models.make."""
    torch.manual_seed(seed)
    return TinyConvNet().eval(), {"pixel_values": torch.randn(2, 3, 8, 8)}, None


# Base layers of every supported kind, with an input for each.
BASES = {
    "linear": (lambda: nn.Linear(24, 36), (5, 24)),
    "linear-3d": (lambda: nn.Linear(20, 12), (2, 3, 20)),
    "conv3x3": (lambda: nn.Conv2d(6, 12, 3, padding=1), (2, 6, 7, 7)),
    "conv1x1": (lambda: nn.Conv2d(6, 10, 1), (2, 6, 5, 5)),
    "conv-grouped-strided": (lambda: nn.Conv2d(8, 12, (3, 2), stride=2, groups=2, bias=False), (2, 8, 9, 9)),
    "conv-reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (1, 4, 6, 6)),
}


def make_base(kind: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = BASES[kind]
    base = factory().to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return base, x


def hf_twin(ours, hf_cls, hf_config, r, alpha, adapter="default"):
    """HF PEFT's layer over a copy of ours' base, with ours' factor values."""
    theirs = hf_cls(copy.deepcopy(ours.base_layer), adapter, config=hf_config, r=r, alpha=alpha)
    for n in theirs.adapter_layer_names:  # HF PEFT upcasts fp16/bf16 factors at the model level
        d = getattr(theirs, n)
        if adapter in d and d[adapter].dtype in (torch.float16, torch.bfloat16):
            d[adapter] = nn.Parameter(d[adapter].detach().float())
    copy_factors(ours, theirs, adapter)
    return theirs


def copy_factors(ours, theirs, adapter="default"):
    with torch.no_grad():
        for n in ours.param_names:
            d = getattr(ours, n)
            if adapter in d:
                assert getattr(theirs, n)[adapter].shape == d[adapter].shape, n
                getattr(theirs, n)[adapter].copy_(d[adapter])


def factor_grads(layer, names, adapter="default"):
    return {n: getattr(layer, n)[adapter].grad for n in names if adapter in getattr(layer, n)}
