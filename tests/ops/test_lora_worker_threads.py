"""The LoRA CPU kernels call at:: ops from OpenMP worker threads (dropout chunks, per-adapter GEMMs).
Those threads must run with the caller's dispatch state: fp32 adapters that require grad (no cast copy
in the kernel) made at::mm_out throw there, and inputs that require grad would record autograd graphs."""

import pytest
import torch
from torch import nn

import peftx
from peftx.ops import lora as lora_ops
from peftx.ops.reference import lora_linear_ref

pytestmark = pytest.mark.usefixtures("isolated_rng")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_chunks_on_worker_threads_with_grad_requiring_adapters(two_threads, dtype):
    torch.manual_seed(0)
    # M * K well above one chunk, so several workers run chunks; fp32 adapters under an fp32 input are
    # used as they are (they require grad).
    layer = peftx.LoraLinear(nn.Linear(384, 384).to(dtype), r=8, lora_alpha=16, lora_dropout=0.1).train()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(16, 14, 384, dtype=dtype, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    y.square().sum().backward()
    grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The same computation on one thread gives the same result: the chunks are independent.
    torch.set_num_threads(1)
    x1 = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    torch.manual_seed(1)
    y1 = layer(x1)
    y1.square().sum().backward()
    torch.testing.assert_close(y1, y, atol=0, rtol=0)
    # x.grad takes g B, whose rank kernels sum per-thread partials over column chunks sized by the
    # thread count: equal to rounding (fp32: a few ulps of the largest gradient, about 60 here).
    scale = grads[0].abs().max().item()
    tol = dict(atol=4e-6 * scale, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-5)
    torch.testing.assert_close(x1.grad, grads[0], **tol)


def test_worker_thread_forward_matches_reference(two_threads):
    torch.manual_seed(0)
    x = torch.randn(300, 512)
    w = torch.randn(256, 512) / 20
    A = torch.randn(8, 512, requires_grad=True)
    B = torch.randn(256, 8, requires_grad=True)
    y, _ = lora_ops.lora_linear_fwd(x, w, None, None, 64, None, A, B, 2.0, 0.2, 1234)
    ref = lora_linear_ref(x, w, None, A.detach(), B.detach(), 2.0, 0.2, 1234)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
