import pytest
import torch

import peftx


def _linear(out_f=24, in_f=40, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_forward_matches_dequantized(device, compute_dtype):
    lin = _linear().to(device)
    q = peftx.Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(2, 5, 40, device=device)
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (2, 5, 24)
    xd = x.to(compute_dtype or x.dtype)
    ref = (xd.float() @ q.weight.dequantize(torch.float32).T + lin.bias.float()).to(x.dtype)
    tol = 1e-4 if compute_dtype is None else 1e-1
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    # close to the original layer (quantization error only)
    assert (y - lin(x)).abs().mean() < 0.1 * lin(x).abs().mean()


def test_eval_then_train_keeps_input_gradient(device):
    q = peftx.Linear4bit.from_linear(_linear().to(device))
    x = torch.randn(3, 40, device=device)
    q.eval()
    with torch.no_grad():
        q(x)
    q(x)  # eval forward with grad mode on, no requires_grad input
    q.train()
    xr = x.clone().requires_grad_(True)
    q(xr).sum().backward()
    assert xr.grad is not None
    torch.testing.assert_close(xr.grad, q.weight.dequantize(torch.float32).sum(0).expand(3, 40), atol=1e-4, rtol=1e-4)
    assert q.bias.grad is not None


def test_state_dict_round_trip(tmp_path):
    q = peftx.Linear4bit.from_linear(_linear())
    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    other = peftx.Linear4bit.from_linear(_linear(bias=True).requires_grad_(False))
    with torch.no_grad():
        other.weight = peftx.nf4_quantize(torch.randn(24, 40))
    other.load_state_dict(torch.load(path))
    x = torch.randn(4, 40)
    assert torch.equal(other(x), q(x))


def test_dtype_casts_do_not_touch_nf4_state():
    q = peftx.Linear4bit.from_linear(_linear())
    before = {k: v.clone() for k, v in q.weight.tensors().items()}
    q.half()
    for k, v in q.weight.tensors().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert q.bias.dtype == torch.float16


def test_weight_is_frozen_and_not_a_parameter():
    q = peftx.Linear4bit.from_linear(_linear())
    names = [n for n, _ in q.named_parameters()]
    assert names == ["bias"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="linear"):
        peftx.Linear4bit.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="compute_dtype"):
        peftx.Linear4bit.from_linear(_linear(), compute_dtype=torch.int8)
    q = peftx.Linear4bit.from_linear(_linear())
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(2, 39))
    other = peftx.Linear4bit.from_linear(_linear(out_f=8))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(q.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_move_and_cpu_parity():
    q = peftx.Linear4bit.from_linear(_linear())
    x = torch.randn(3, 40)
    y_cpu = q(x)
    qc = q.cuda()
    assert qc.weight.device.type == "cuda"
    torch.testing.assert_close(qc(x.cuda()).cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    # quantizing on the GPU gives the same bytes as on the CPU
    w = torch.randn(33, 70)
    a, b = peftx.nf4_quantize(w), peftx.nf4_quantize(w.cuda())
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k].cpu()), k
