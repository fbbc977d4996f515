"""torch.compile(fullgraph=True) of the LoRA layers in training mode with dropout: the seed is drawn
inside the graph from torch's generator (an unbacked SymInt for the ops' SymInt seed argument), so
the compiled layer gives eager's outputs and gradients bit for bit under the same torch.manual_seed,
and a new mask at every call rather than one seed baked into the graph."""

import pytest
import torch
from torch import nn

import peftx


def _layer(kind):
    torch.manual_seed(0)
    if kind == "dense":
        m = peftx.LoraLinear(nn.Linear(64, 48), r=4, lora_alpha=8, lora_dropout=0.2)
    else:
        m = peftx.LoraLinear4bit.from_linear(nn.Linear(64, 48), r=4, lora_alpha=8, lora_dropout=0.2,
                                             compute_dtype=torch.float32, double_quant=kind == "nf4-dq")
    nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    return m.train()


@pytest.mark.parametrize("kind", ["dense", "nf4", "nf4-dq"])
def test_compiled_training_forward_backward_equals_eager(kind):
    m = _layer(kind)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 64)
    results = []
    for fn in (m, compiled):
        xr = x.clone().requires_grad_()
        m.zero_grad()
        torch.manual_seed(11)
        y = fn(xr)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xr.grad, m.lora_A["default"].weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # Two calls without reseeding draw two masks.
    with torch.no_grad():
        assert not torch.equal(compiled(x), compiled(x))
