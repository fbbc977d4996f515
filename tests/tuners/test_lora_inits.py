"""LoRA initialisations that rewrite the base weight (init_lora_weights = 'pissa', 'pissa_niter_<k>',
'olora', 'loftq'): equality with HF PEFT's inits on the same weights, residual base + adapter
reproducing the original weight, LoftQ beating plain QLoRA's quantization error, 4-bit behaviour,
config keys as HF PEFT writes them, and errors."""

import json

import pytest
import torch
from torch import nn

import peftx
from tests.integration.tiny_models import make, twin
from tests.tuners import method_checks as mc


def hf_linear(base, r, alpha, init, fan_in_fan_out=False, use_dora=False):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as HFLinear
    cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init, fan_in_fan_out=fan_in_fan_out, use_dora=use_dora)
    return HFLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, init_lora_weights=init,
                    fan_in_fan_out=fan_in_fan_out, use_dora=use_dora)


def _effective(layer):
    """Base weight [out, in] + scaling * B A, fp32."""
    w = layer.base_layer.weight.detach().float()
    if getattr(layer, "fan_in_fan_out", False):
        w = w.t()
    s = layer.scaling["default"]
    return w + s * (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("alpha", [8, 32])
def test_matches_hf_init_and_reproduces_the_weight(init, alpha):
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    w0 = base.weight.detach().clone()
    hf_base = twin(base)
    torch.manual_seed(1)  # svd_lowrank draws a random start: the same for both
    ours = peftx.LoraLinear(base, r=8, lora_alpha=alpha, init_lora_weights=init)
    torch.manual_seed(1)
    hf = hf_linear(hf_base, 8, alpha, init)
    for k in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, k)["default"].weight, getattr(hf, k)["default"].weight,
                                   atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.base_layer.weight, hf.base_layer.weight, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours.base_layer.weight, w0)  # the residual went into the base
    torch.testing.assert_close(_effective(ours), w0, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 40)
    torch.testing.assert_close(ours(x), nn.functional.linear(x, w0, base.bias), atol=1e-5, rtol=1e-5)


def test_pissa_takes_the_principal_subspace():
    torch.manual_seed(2)
    base = nn.Linear(30, 20)
    S = torch.linalg.svdvals(base.weight.detach())
    layer = peftx.LoraLinear(base, r=4, lora_alpha=4, init_lora_weights="pissa")
    # The adapter carries the top-4 singular values, the residual the rest.
    torch.testing.assert_close(torch.linalg.svdvals(layer.get_delta_weight("default"))[:4], S[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight.detach())[:16], S[4:], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conv1d_fan_in_fan_out(init):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(3)
    base = Conv1D(24, 40)
    w0 = base.weight.detach().clone()
    hf_base = twin(base)
    ours = peftx.LoraLinear(base, r=4, lora_alpha=8, fan_in_fan_out=True, init_lora_weights=init)
    assert ours.lora_B["default"].weight.shape == (24, 4) and ours.lora_A["default"].weight.shape == (4, 40)
    torch.testing.assert_close(_effective(ours), w0.t(), atol=1e-5, rtol=1e-5)
    if init == "pissa":  # HF PEFT's OLoRA ignores fan_in_fan_out (QR of the [in, out] weight): no comparison
        hf = hf_linear(hf_base, 4, 8, init, fan_in_fan_out=True)
        torch.testing.assert_close(ours.base_layer.weight, hf.base_layer.weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.lora_B["default"].weight, hf.lora_B["default"].weight, atol=1e-5, rtol=1e-4)


def test_dora_after_pissa_matches_hf():
    torch.manual_seed(4)
    base = nn.Linear(32, 16)
    w0 = base.weight.detach().clone()
    hf_base = twin(base)
    ours = peftx.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights="pissa", use_dora=True)
    hf = hf_linear(hf_base, 4, 8, "pissa", use_dora=True)
    m = ours.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m, hf.lora_magnitude_vector["default"].weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, torch.linalg.vector_norm(w0, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_model_level_identity_and_round_trip(kind, init, tmp_path):
    import peft
    model, inputs, task = make(kind)
    config = peftx.LoraConfig(task_type=task, r=4, lora_alpha=8, init_lora_weights=init)
    pm = mc.check_identity_at_init(model, inputs, config, atol=1e-4)
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_trainable_params_equal_hf(model, config, peft.LoraConfig(task_type=task, r=4, init_lora_weights=init))
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init
    assert peft.LoraConfig.from_pretrained(tmp_path).init_lora_weights == init


def test_4bit_pissa_is_refused_and_olora_requantizes():
    torch.manual_seed(5)
    linear = nn.Linear(64, 32)
    with pytest.raises(TypeError, match="PiSSA on the unquantized model"):
        peftx.LoraLinear4bit.from_linear(linear, r=4, init_lora_weights="pissa")
    layer = peftx.LoraLinear4bit.from_linear(linear, r=4, lora_alpha=4, init_lora_weights="olora",
                                             compute_dtype=torch.float32)
    plain = peftx.Linear4bit.from_linear(linear, compute_dtype=torch.float32).weight.dequantize(torch.float32)
    Q, R = torch.linalg.qr(plain)
    torch.testing.assert_close(layer.lora_B["default"].weight, Q[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight, R[:4], atol=1e-5, rtol=1e-5)
    # The residual is re-quantized: residual + adapter is the dequantized weight up to exactly the NF4
    # error of the residual.
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        residual = plain - delta
        eff = layer.base_layer.weight.dequantize(torch.float32) + delta
        requant_err = peftx.NF4Weight.quantize(residual).dequantize(torch.float32) - residual
    torch.testing.assert_close(eff - plain, requant_err, atol=1e-6, rtol=0)


def _loftq_error(linear, r, alpha, iters, blocksize=64):
    layer = peftx.LoraLinear4bit.from_linear(linear, r=r, lora_alpha=alpha, init_lora_weights="loftq",
                                             loftq_config=peftx.LoftQConfig(loftq_bits=4, loftq_iter=iters),
                                             blocksize=blocksize, compute_dtype=torch.float32)
    eff = layer.base_layer.weight.dequantize(torch.float32) + layer.get_delta_weight("default")
    return torch.linalg.matrix_norm(linear.weight.detach() - eff).item(), layer


@pytest.mark.parametrize("alpha", [8, 16, 64])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_loftq_starts_closer_to_the_weight_than_plain_qlora(alpha, blocksize):
    torch.manual_seed(6)
    linear = nn.Linear(128, 96)
    with torch.no_grad():  # a weight with a few strong directions, as trained weights have
        linear.weight += 0.05 * torch.randn(96, 4) @ torch.randn(4, 128)
    w = linear.weight.detach()
    plain = peftx.LoraLinear4bit.from_linear(linear, r=8, lora_alpha=alpha, blocksize=blocksize,
                                             compute_dtype=torch.float32)
    qlora_err = torch.linalg.matrix_norm(w - plain.base_layer.weight.dequantize(torch.float32)).item()
    errs = [_loftq_error(linear, 8, alpha, it, blocksize)[0] for it in (1, 2, 4)]
    assert all(e < 0.9 * qlora_err for e in errs), (qlora_err, errs)
    _, layer = _loftq_error(linear, 8, alpha, 1, blocksize)
    x = torch.randn(4, 128)
    with torch.no_grad():
        y_full = linear(x)
        assert (layer(x) - y_full).norm() < (plain(x) - y_full).norm()


def test_loftq_dense_target_writes_the_quantized_weight_as_hf():
    model, inputs, task = make("llama")
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = peftx.LoraConfig(task_type=task, r=4, lora_alpha=4, init_lora_weights="loftq",
                              loftq_config=peftx.LoftQConfig(loftq_bits=4, loftq_iter=2))
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    pm = peftx.get_peft_model(twin(model), config)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    deq = layer.base_layer.weight.detach()
    # The base now holds dequant(Q): quantizing it again gives the same values (what the user does next).
    requant = peftx.NF4Weight.quantize(deq).dequantize(torch.float32)
    torch.testing.assert_close(requant, deq, atol=1e-2 * deq.abs().max().item(), rtol=0)
    err = torch.linalg.matrix_norm(w - (deq + layer.get_delta_weight("default")))
    qlora_err = torch.linalg.matrix_norm(w - peftx.NF4Weight.quantize(w).dequantize(torch.float32))
    assert err < qlora_err


def test_loftq_config_file_as_hf(tmp_path):
    model, inputs, task = make("llama")
    config = peftx.LoraConfig(task_type=task, r=4, init_lora_weights="loftq", loftq_config=peftx.LoftQConfig())
    pm = peftx.get_peft_model(twin(model), config)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq"
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    back = peftx.LoraConfig.from_pretrained(tmp_path) if hasattr(peftx.LoraConfig, "from_pretrained") else \
        peftx.LoraConfig.from_dict(peftx.LoraConfig.read_dict(tmp_path))
    assert back.loftq_config == {"loftq_bits": 4, "loftq_iter": 1} and back.init_lora_weights == "loftq"
    pytest.importorskip("scipy")  # HF PEFT's LoraConfig requires scipy for init_lora_weights='loftq'
    import peft
    hf = peft.LoraConfig.from_pretrained(tmp_path)
    assert hf.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}


def test_init_errors():
    with pytest.raises(ValueError, match="loftq_config must be given"):
        peftx.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="init_lora_weights must be"):
        peftx.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        assert peftx.LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}
    linear = nn.Linear(32, 16)
    with pytest.raises(ValueError, match="loftq_bits=8 is not supported"):
        peftx.LoraLinear(linear, init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 1})
    q = peftx.Linear4bit.from_linear(nn.Linear(32, 16))
    with pytest.raises(ValueError, match="needs the full-precision weight.*from_linear"):
        peftx.LoraLinear4bit(q, init_lora_weights="loftq", loftq_config=peftx.LoftQConfig())
    model, inputs, task = make("llama")
    with pytest.raises(ValueError, match="not supported for nn.Embedding"):
        peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, init_lora_weights="olora",
                                                           target_modules=["embed_tokens"]))
