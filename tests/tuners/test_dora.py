"""DoRA (LoraConfig(use_dora=True)): LoraLinear (nn.Linear, GPT-2 Conv1D) and LoraLinear4bit against HF
PEFT's DoRA layers on the same weights, gradients against the pure-torch reference (float64 gradcheck
on the dense path), dropout, several active adapters, merge/unmerge, the shared method checks, HF
round trips, and the errors for what DoRA does not support."""

import pytest
import torch
from torch import nn

import peftx
from peftx.ops.reference import dora_linear_ref
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc

# Output tolerances vs HF PEFT / the fp64 reference, by the base weight's dtype. HF computes the
# norm in the input dtype, peftx in fp32, so bf16 differs by a few bf16 ulps of the output.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}


def hf_dora_linear(base, r, alpha, dropout=0.0, fan_in_fan_out=False):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as HFLinear
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True, fan_in_fan_out=fan_in_fan_out)
    return HFLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                    fan_in_fan_out=fan_in_fan_out)


def randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in layer.adapters:
            mag = [layer.lora_magnitude_vector[n].weight] if n in layer.lora_magnitude_vector else []
            for p in (layer.lora_A[n].weight, layer.lora_B[n].weight, *mag):
                p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))


def copy_adapter(ours, hf, name="default"):
    with torch.no_grad():
        hf.lora_A[name].weight.copy_(ours.lora_A[name].weight)
        hf.lora_B[name].weight.copy_(ours.lora_B[name].weight)
        hf.lora_magnitude_vector[name].weight.copy_(ours.lora_magnitude_vector[name].weight)


def _grads(layer):
    return [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
            layer.lora_magnitude_vector["default"].weight.grad]


def _assert_matches_hf(ours, hf, x, y_tol, dx_tol, param_tol):
    """ours(x) equals hf(x), and so do the gradients of x and of the DoRA parameters."""
    x = x.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_hf = ours(x), hf(x2)
    torch.testing.assert_close(y, y_hf, **y_tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_hf.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, **dx_tol)
    for a, b in zip(_grads(ours), _grads(hf)):
        torch.testing.assert_close(a, b, **param_tol)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_hf_dora_linear_forward_and_gradients(bias):
    torch.manual_seed(1)
    base = nn.Linear(48, 20, bias=bias)
    hf_base = twin(base)
    ours = peftx.LoraLinear(base, r=6, lora_alpha=12, use_dora=True)
    hf = hf_dora_linear(hf_base, 6, 12)
    # Same init rule: the magnitude is the row norm of W (B = 0).
    torch.testing.assert_close(ours.lora_magnitude_vector["default"].weight,
                               hf.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=1e-6)
    randomize(ours)
    copy_adapter(ours, hf)
    _assert_matches_hf(ours, hf, torch.randn(2, 7, 48), TOL[torch.float32], dict(atol=1e-4, rtol=1e-4),
                       dict(atol=1e-4, rtol=1e-4))
    # Same module structure, so the same state-dict keys as HF PEFT.
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "lora_magnitude_vector.default.weight" in ours.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_within_the_tolerance_table(dtype):
    torch.manual_seed(2)
    base = nn.Linear(64, 32).to(dtype)
    hf_base = twin(base)
    ours = peftx.LoraLinear(base, r=4, lora_alpha=8, use_dora=True)
    hf = hf_dora_linear(hf_base, 4, 8)
    randomize(ours)
    copy_adapter(ours, hf)
    x = torch.randn(3, 5, 64).to(dtype)
    with torch.no_grad():
        y, y_hf = ours(x), hf(x)
        A, B = ours.lora_A["default"].weight.double(), ours.lora_B["default"].weight.double()
        m = ours.lora_magnitude_vector["default"].weight.double()
        ref = dora_linear_ref(x.double(), base.weight.double(), base.bias.double(), A, B, m, 2.0)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    torch.testing.assert_close(y, y_hf.to(dtype), **TOL[dtype])


def test_conv1d_fan_in_fan_out_matches_hf():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(3)
    base = Conv1D(24, 40)  # weight [in=40, out=24]
    hf_base = twin(base)
    ours = peftx.LoraLinear(base, r=4, lora_alpha=4, fan_in_fan_out=True, use_dora=True)
    hf = hf_dora_linear(hf_base, 4, 4, fan_in_fan_out=True)
    torch.testing.assert_close(ours.lora_magnitude_vector["default"].weight,
                               hf.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=1e-6)
    randomize(ours)
    copy_adapter(ours, hf)
    x = torch.randn(2, 5, 40)
    torch.testing.assert_close(ours(x), hf(x), **TOL[torch.float32])
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        ref = ours(x)
        ours.merge()
        hf.merge()
        torch.testing.assert_close(ours.base_layer.weight, hf.base_layer.weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
        ours.unmerge()
        torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-6, rtol=1e-5)


def test_dropout_in_training_matches_hf():
    torch.manual_seed(4)
    base = nn.Linear(32, 16)
    hf_base = twin(base)
    ours = peftx.LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True).train()
    hf = hf_dora_linear(hf_base, 4, 8, dropout=0.3).train()
    randomize(ours)
    copy_adapter(ours, hf)
    x = torch.randn(6, 32)
    torch.manual_seed(11)
    y = ours(x)
    torch.manual_seed(11)
    y_hf = hf(x)
    torch.testing.assert_close(y, y_hf, **TOL[torch.float32])
    # The formula with dropout: the base term sees x, the correction and the low-rank term D(x).
    torch.manual_seed(11)
    xd = nn.functional.dropout(x, 0.3, True)
    A, B = ours.lora_A["default"].weight, ours.lora_B["default"].weight
    ref = dora_linear_ref(x, base.weight, base.bias, A, B, ours.lora_magnitude_vector["default"].weight, 2.0, xd)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


def test_gradcheck_float64_and_gradients_vs_reference():
    torch.manual_seed(5)
    base = nn.Linear(12, 7).double()
    layer = peftx.LoraLinear(base, r=3, lora_alpha=6, use_dora=True)
    randomize(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    assert A.dtype == torch.float64 and m.dtype == torch.float64

    def f(x, mag):
        return torch.func.functional_call(layer, {"lora_magnitude_vector.default.weight": mag}, (x,))

    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    # The norm is detached by definition, so gradcheck (numeric differences) applies to x and the
    # magnitude, on which the norm does not depend; A and B are checked against the reference below.
    assert torch.autograd.gradcheck(f, (x, m.detach().clone().requires_grad_()))
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    Ar, Br, mr = (t.detach().clone().requires_grad_() for t in (A, B, m))
    ref = dora_linear_ref(xr, base.weight, base.bias, Ar, Br, mr, 2.0)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    ref.backward(g)
    for got, want in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad), (m.grad, mr.grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
def test_4bit_matches_hf_over_the_dequantized_weight(blocksize, double_quant):
    torch.manual_seed(6)
    linear = nn.Linear(96, 40)
    ours = peftx.LoraLinear4bit.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True,
                                            blocksize=blocksize, double_quant=double_quant,
                                            compute_dtype=torch.float32)
    dense = nn.Linear(96, 40)
    with torch.no_grad():
        dense.weight.copy_(ours.base_layer.weight.dequantize(torch.float32))
        dense.bias.copy_(linear.bias)
    hf = hf_dora_linear(dense, 8, 16)
    torch.testing.assert_close(ours.lora_magnitude_vector["default"].weight,
                               hf.lora_magnitude_vector["default"].weight, atol=1e-5, rtol=1e-5)
    randomize(ours)
    copy_adapter(ours, hf)
    _assert_matches_hf(ours, hf, torch.randn(3, 4, 96), dict(atol=1e-4, rtol=1e-4), dict(atol=1e-4, rtol=1e-4),
                       dict(atol=2e-4, rtol=2e-4))


def test_4bit_bf16_compute_and_merge_with_exact_unmerge():
    torch.manual_seed(7)
    m = peftx.LoraLinear4bit.from_linear(nn.Linear(128, 48), r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True)
    randomize(m)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    packed0 = m.base_layer.weight.packed.clone()
    with torch.no_grad():
        before = m(x)
        assert before.dtype == torch.bfloat16
        W = m.base_layer.weight.dequantize(torch.float32).double()
        A, B = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        mag = m.lora_magnitude_vector["default"].weight.double()
        ref = dora_linear_ref(x.double(), W, m.base_layer.bias.double(), A, B, mag, 2.0)
        torch.testing.assert_close(before.double(), ref, **TOL[torch.bfloat16])
        m.merge()
        assert 0 < m.merge_errors["default"] < 0.3
        torch.testing.assert_close(m(x).double(), ref, atol=0.3, rtol=0.1)  # re-quantized NF4 + bf16
        m.unmerge()
        assert torch.equal(m.base_layer.weight.packed, packed0)
        assert torch.equal(m(x), before)


def test_merge_unmerge_several_adapters_matches_hf():
    torch.manual_seed(8)
    base = nn.Linear(30, 18)
    hf_base = twin(base)
    w0 = base.weight.detach().clone()
    ours = peftx.LoraLinear(base, r=4, lora_alpha=8, use_dora=True)
    ours.add_adapter("plain", r=2, lora_alpha=2)
    ours.add_adapter("d2", r=3, lora_alpha=3, use_dora=True)
    for n in ours.adapters:
        nn.init.normal_(ours.lora_B[n].weight, std=0.3)
    randomize(ours)
    from peft import LoraConfig
    hf = hf_dora_linear(hf_base, 4, 8)
    hf.update_layer("plain", 2, 2, config=LoraConfig(r=2, lora_alpha=2))
    hf.update_layer("d2", 3, 3, config=LoraConfig(r=3, lora_alpha=3, use_dora=True))
    with torch.no_grad():
        for n in ours.adapters:
            hf.lora_A[n].weight.copy_(ours.lora_A[n].weight)
            hf.lora_B[n].weight.copy_(ours.lora_B[n].weight)
            if n != "plain":
                hf.lora_magnitude_vector[n].weight.copy_(ours.lora_magnitude_vector[n].weight)
    names = ["default", "plain", "d2"]
    ours.set_adapter(names)
    hf.set_adapter(names)
    x = torch.randn(4, 30)
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, hf(x), atol=1e-5, rtol=1e-5)
        ours.merge()
        hf.merge()
        torch.testing.assert_close(ours.base_layer.weight, hf.base_layer.weight, atol=1e-5, rtol=1e-5)
        # Several DoRA adapters: the forward (HF PEFT's) scales the output so far, the merge the
        # base weight, so merged and unmerged outputs agree only for one active DoRA adapter.
        ours.unmerge()
        torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)


def test_adapter_management_covers_the_magnitude():
    layer = peftx.LoraLinear(nn.Linear(16, 8), r=2, use_dora=True)
    layer.add_adapter("other", r=2, use_dora=True)
    mag = layer.lora_magnitude_vector
    assert mag["default"].weight.requires_grad and not mag["other"].weight.requires_grad
    layer.set_adapter("other")
    assert mag["other"].weight.requires_grad and not mag["default"].weight.requires_grad
    layer.enable_adapters(False)
    assert not mag["other"].weight.requires_grad
    layer.enable_adapters(True)
    layer.delete_adapter("other")
    assert set(mag) == {"default"} and layer.use_dora == {"default": True}


def test_unsupported_uses_raise_clear_errors():
    layer = peftx.LoraLinear(nn.Linear(16, 8), r=2, use_dora=True).eval()
    with pytest.raises(ValueError, match="mixed batches.*DoRA"):
        layer(torch.randn(2, 3, 16), adapter_names=["default", "__base__"])
    model, inputs, task = make("llama")
    with pytest.raises(ValueError, match="use_dora=True is not supported for nn.Embedding.*target_modules"):
        peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, use_dora=True,
                                                           target_modules=["embed_tokens", "q_proj"]))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"not supported by LoRA \(use_dora=True\).*target_modules"):
        peftx.get_peft_model(conv, peftx.LoraConfig(use_dora=True, target_modules=["0"]))
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        peftx.LoraConfig(use_dora="yes")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_keeps_the_method_promises(kind, tmp_path):
    import peft
    model, inputs, task = make(kind)
    config = peftx.LoraConfig(task_type=task, r=4, lora_alpha=8, use_dora=True)
    pm = mc.check_identity_at_init(model, inputs, config, atol=1e-5)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector.default.weight" in n for n in names)
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path)
    mc.check_merge_matches(pm, inputs, atol=1e-4, rtol=1e-4)
    mc.check_trainable_params_equal_hf(model, peftx.LoraConfig(task_type=task, r=4, use_dora=True),
                                       peft.LoraConfig(task_type=task, r=4, use_dora=True))
    mc.check_hf_round_trip(model, inputs, peftx.LoraConfig(task_type=task, r=4, use_dora=True),
                           peft.LoraConfig(task_type=task, r=4, use_dora=True), tmp_path, atol=1e-5, rtol=1e-4)


def test_saved_keys_and_config_as_hf(tmp_path):
    import json

    from safetensors.torch import load_file
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, r=4, use_dora=True))
    pm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith("q_proj.lora_magnitude_vector") for k in keys)  # HF PEFT's file key
    assert not any(".default." in k for k in keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


def test_qlora_model_with_dora_trains_the_magnitude():
    model, inputs, task = make("llama")
    q = peftx.quantize_model(twin(model), compute_dtype=torch.float32)
    pm = peftx.get_peft_model(q, peftx.LoraConfig(task_type=task, r=4, use_dora=True))
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, peftx.LoraLinear4bit)
    ref = logits(q, inputs)
    torch.testing.assert_close(logits(pm, inputs), ref, atol=1e-4, rtol=1e-4)
    mc.check_training_moves_every_adapter_param(pm, inputs)
