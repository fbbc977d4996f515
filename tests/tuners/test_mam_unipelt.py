"""MAM (prefix + parallel FFN adapter) and UniPELT (gated LoRA + gated prefix + gated sequential
adapter): the composed adapter's promises, its gates, its files and its errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftx
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc

KINDS = ["llama", "gpt2", "bert", "t5"]
METHODS = {
    "mam": lambda task, **kw: peftx.MAMConfig(**{"task_type": task, "num_virtual_tokens": 4,
                                                 "encoder_hidden_size": 16, **kw}),
    "unipelt": lambda task, **kw: peftx.UniPELTConfig(**{"task_type": task, "num_virtual_tokens": 4,
                                                         "encoder_hidden_size": 16, "r": 4, "reduction_factor": 4, **kw}),
}


def with_prefix_only(pm, model, inputs):
    """The base model's logits with the PeftModel's prefix cache (and nothing else of the adapter)."""
    with torch.no_grad():
        return model(**pm._with_prefix((), dict(inputs))).logits


def randomize_injected(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and ("lora_" in n or "bottleneck_" in n):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_composed_method_keeps_its_promises(method, kind, tmp_path):
    model, inputs, task = make(kind)
    pm = peftx.get_peft_model(twin(model), METHODS[method](task))
    # The injected part is the identity at init: the model computes as the base model with the prefix.
    torch.testing.assert_close(logits(pm, inputs), with_prefix_only(pm, model, inputs), atol=0, rtol=0)
    assert not torch.equal(logits(pm, inputs), logits(model, inputs))  # the prefix acts from the start
    mc.check_training_moves_every_adapter_param(pm, inputs)
    trained = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("prefix_part" in n for n in trained) and any("bottleneck_" in n for n in trained)
    if method == "unipelt":
        assert any("lora_gate" in n for n in trained) and any("bottleneck_gate" in n for n in trained)
        assert any("prefix_part.default.gate" in n for n in trained)
    mc.check_save_load_exact(pm, model, inputs, tmp_path)
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_disable_and_unload_give_the_base_model(method, kind):
    model, inputs, task = make(kind)
    ref, ref_sd = logits(model, inputs), {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftx.get_peft_model(twin(model), METHODS[method](task))
    randomize_injected(pm)
    with pm.disable_adapter():
        assert torch.equal(logits(pm, inputs), ref)
    assert not torch.equal(logits(pm, inputs), ref)
    base = pm.unload()
    assert [type(m) for m in base.modules()] == [type(m) for m in model.modules()]
    assert not any(m._forward_pre_hooks for m in base.modules())
    sd = base.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert torch.equal(logits(base, inputs), ref)


def test_mam_defaults_follow_he_et_al():
    c = peftx.MAMConfig()
    assert (c.num_virtual_tokens, c.prefix_projection, c.encoder_hidden_size) == (30, True, 512)
    assert (c.scaling, c.reduction_factor, c.non_linearity, c.placement, c.form) == (4.0, 2, "relu", "pfeiffer",
                                                                                     "parallel")
    model, _, task = make("llama")
    pm = peftx.get_peft_model(model, peftx.MAMConfig(task_type=task))
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, peftx.BottleneckLayer)}
    assert sorted(n.split(".", 4)[-1] for n in layers) == ["0.mlp.down_proj", "1.mlp.down_proj"]
    for m in layers.values():
        assert m.adapters["default"].form == "parallel" and m.adapters["default"].scaling == 4.0
        assert m.bottleneck_down["default"].weight.shape == (16, 32)  # hidden 32 // 2
    assert pm.prefix_part["default"].encoder.embedding.weight.shape[0] == 30


def test_unipelt_structure():
    model, _, task = make("llama")
    pm = peftx.get_peft_model(model, peftx.UniPELTConfig(task_type=task))
    kinds = [type(m).__name__ for m in pm.modules() if isinstance(m, (peftx.GatedLoraLinear, peftx.BottleneckLayer))]
    assert sorted(kinds) == ["BottleneckLayer"] * 2 + ["GatedLoraLinear"] * 4
    names = {n for n, _ in pm.named_modules()}
    for i in (0, 1):
        layer = f"base_model.model.model.layers.{i}"
        assert isinstance(pm.get_submodule(f"{layer}.self_attn.q_proj"), peftx.GatedLoraLinear)
        assert isinstance(pm.get_submodule(f"{layer}.self_attn.v_proj"), peftx.GatedLoraLinear)
        down = pm.get_submodule(f"{layer}.mlp.down_proj")
        assert isinstance(down, peftx.BottleneckLayer) and down.adapters["default"].gated
        assert down.adapters["default"].form == "sequential"
        assert f"{layer}.self_attn.o_proj.bottleneck_down" not in names
    assert pm.prefix_part["default"].gate.weight.shape == (2, 32)  # one gate per layer


def test_gated_lora_formula():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = peftx.GatedLoraLinear(base, r=2, lora_alpha=4)
    x = torch.randn(3, 5, 8)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_gate["default"].bias.fill_(0.3)
    A, B, gate = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_gate["default"]
    g = torch.sigmoid(x @ gate.weight.t() + gate.bias)
    torch.testing.assert_close(layer(x), base(x) + g * (x @ A.t() @ B.t()) * (4 / 2))
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()
    with pytest.raises(ValueError, match="adapter_names"):
        layer(x, adapter_names=["default"] * 3)


def test_gated_adapter_and_prefix_formulas():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, METHODS["unipelt"](task))
    randomize_injected(pm)
    down = pm.get_submodule("base_model.model.model.layers.0.mlp.down_proj")
    d, u, gt = down.bottleneck_down["default"], down.bottleneck_up["default"], down.bottleneck_gate["default"]
    h = torch.randn(2, 3, 32)
    expected = torch.sigmoid(h @ gt.weight.t() + gt.bias) * (torch.relu(h @ d.weight.t() + d.bias) @ u.weight.t() + u.bias)
    torch.testing.assert_close(down.adapter_output(h, "default"), expected)

    part = pm.prefix_part["default"]
    x_bar = torch.randn(2, 32)
    g = torch.sigmoid(x_bar @ part.gate.weight.t() + part.gate.bias)  # [batch, layers]
    raw = part.encoder.prompts(2).view(2, 4, 2, -1)
    torch.testing.assert_close(part.prefix(2, x_bar), (raw * g[:, None, :, None]).view(2, 4, -1))
    # the gate reads the mask-weighted mean of the input embeddings
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, 5:] = 0
    emb = pm.get_base_model().get_input_embeddings()(inputs["input_ids"])
    got = pm._gate_input({"input_ids": inputs["input_ids"], "attention_mask": mask})
    torch.testing.assert_close(got[1], emb[1, :5].mean(0))
    torch.testing.assert_close(got[0], emb[0].mean(0))


def test_named_composed_adapters(tmp_path):
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), METHODS["mam"](task))
    out_default = logits(pm, inputs)
    pm.add_adapter("other", METHODS["mam"](task, num_virtual_tokens=3))
    assert torch.equal(logits(pm, inputs), out_default)
    pm.set_adapter("other")
    out_other = logits(pm, inputs)
    assert not torch.equal(out_other, out_default)
    pm.save_pretrained(tmp_path)
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "other")
    assert torch.equal(logits(back, inputs), out_other)
    pm.delete_adapter("other")
    assert "other" not in pm.prefix_part and pm.active_adapter == "default"
    assert torch.equal(logits(pm, inputs), out_default)


def test_file_format(tmp_path):
    model, _, task = make("bert")
    pm = peftx.get_peft_model(model, METHODS["unipelt"](task))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "UNIPELT" and cfg["num_virtual_tokens"] == 4
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    layer0 = "base_model.model.bert.encoder.layer.0"
    assert {"prompt_embeddings", "prefix_gate.weight", "prefix_gate.bias",
            f"{layer0}.attention.self.query.lora_A.weight", f"{layer0}.attention.self.query.lora_gate.weight",
            f"{layer0}.output.dense.bottleneck_gate.weight", f"{layer0}.output.dense.bottleneck_up.bias"} <= keys
    table = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    assert table.shape == (4, 2 * 2 * 32)  # virtual tokens x (layers * 2 * hidden)


def test_errors():
    model, _, task = make("llama")
    with pytest.raises(ValueError, match="also adapter sites.*change target_modules"):
        peftx.get_peft_model(twin(model), peftx.UniPELTConfig(task_type=task, target_modules=["q_proj", "down_proj"]))
    with pytest.raises(ValueError, match="reduction_factor must be a positive number"):
        peftx.MAMConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        peftx.UniPELTConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        peftx.UniPELTConfig(r=0)
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        peftx.MAMConfig(non_linearity="sigmoid")


def test_model_without_a_kv_cache():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, x):
            return x + self.ff(x)
    with pytest.raises(ValueError, match="could not read"):
        peftx.get_peft_model(Toy(), peftx.MAMConfig(ffn_modules={"ff.2": "ff"}))


# UniPELT's prefix gate reads the whole input, so only where that input is fixed during generation (the
# encoder's, T5) does step-by-step forward reproduce generate(); decoder-only UniPELT gates from the prompt.
@pytest.mark.parametrize("kind,method", [("llama", "mam"), ("gpt2", "mam"), ("t5", "mam"), ("t5", "unipelt")])
def test_generate_matches_step_by_step_forward(kind, method):
    model, inputs, task = make(kind)
    pm = peftx.get_peft_model(twin(model), METHODS[method](task)).eval()
    mc.randomize_adapter(pm)
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    n = 4
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ref = []
        if kind == "t5":
            seq = torch.zeros(ids.shape[0], 1, dtype=torch.long)
            for _ in range(n):
                ref.append(pm(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits[:, -1])
                seq = torch.cat([seq, ref[-1].argmax(-1, keepdim=True)], 1)
        else:
            seq, m = ids, mask
            for _ in range(n):
                pos = (m.cumsum(-1) - 1).clamp(min=0)
                ref.append(pm(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1])
                seq = torch.cat([seq, ref[-1].argmax(-1, keepdim=True)], 1)
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert out.sequences.tolist() == seq.tolist()
    for got, want in zip(out.logits, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pm.disable_adapter(), torch.no_grad():
        plain = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert plain.tolist() == base.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_matches_cpu(method):
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), METHODS[method](task)).eval()
    mc.randomize_adapter(pm)
    ref = logits(pm, inputs)
    pm = pm.cuda()
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    torch.testing.assert_close(logits(pm, cuda_inputs).cpu(), ref, atol=1e-4, rtol=1e-4)
    pm(**cuda_inputs).logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert all(g is not None and g.is_cuda for g in grads.values())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_model_with_fp32_adapter(method):
    model, inputs, task = make("llama")
    model = model.to(torch.bfloat16)
    pm = peftx.get_peft_model(twin(model), METHODS[method](task))
    assert all(p.dtype == torch.float32 for p in pm.parameters() if p.requires_grad)
    torch.testing.assert_close(logits(pm, inputs), with_prefix_only(pm, model, inputs), atol=0, rtol=0)
    mc.check_training_moves_every_adapter_param(pm, inputs)
