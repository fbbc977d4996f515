"""Bottleneck adapters (Houlsby / Pfeiffer placements, sequential / parallel forms) through the shared
method checks, plus where exactly they act in each architecture, adapter management and errors."""

import copy

import pytest
import torch
from torch import nn

import peftx
from peftx.tuners.bottleneck.placements import PLACEMENT_TABLE
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc

KINDS = ["llama", "gpt2", "bert", "t5"]
SHAPES = [("houlsby", "sequential"), ("houlsby", "parallel"), ("pfeiffer", "sequential"), ("pfeiffer", "parallel")]


def config(task, placement="houlsby", form="sequential", **kw):
    return peftx.AdapterConfig(task_type=task, placement=placement, form=form, reduction_factor=4, **kw)


def randomize_adapters_only(pm, seed=0):
    """Moves the bottleneck parameters (not a trained task head) away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "bottleneck_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def layers(pm):
    return {n: m for n, m in pm.named_modules() if isinstance(m, peftx.BottleneckLayer)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement,form", SHAPES)
def test_bottleneck_keeps_the_method_promises(kind, placement, form, tmp_path):
    model, inputs, task = make(kind)
    pm = mc.check_identity_at_init(model, inputs, config(task, placement, form))
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path)
    with pytest.raises(ValueError, match="cannot be merged.*unload"):
        pm.merge_and_unload()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_unload_restores_the_original_model_exactly(kind, form):
    model, inputs, task = make(kind)
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, inputs)
    pm = peftx.get_peft_model(twin(model), config(task, "houlsby", form))
    randomize_adapters_only(pm)  # the SEQ_CLS head copy stays as it is: unload() keeps a trained head
    assert not torch.equal(logits(pm, inputs), ref)
    base = pm.unload()
    assert not any(isinstance(m, peftx.BottleneckLayer) for m in base.modules())
    assert not any(m._forward_pre_hooks for m in base.modules()), "a parallel adapter's input hook was left behind"
    sd = base.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert [type(m) for m in base.modules()] == [type(m) for m in model.modules()]
    assert torch.equal(logits(base, inputs), ref)


# --- where the adapters act ------------------------------------------------------------------------
EXPECTED_SITES = {  # (sites per layer block, attention sites in the whole tiny model)
    "llama": ({"self_attn.o_proj", "mlp.down_proj"}, 2),
    "gpt2": ({"attn.c_proj", "mlp.c_proj"}, 2),
    "bert": ({"attention.output.dense", "output.dense"}, 2),
    "t5": ({"SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"}, 6),  # 2 enc self, 2 dec self, 2 cross
}


@pytest.mark.parametrize("kind", KINDS)
def test_sites_are_the_documented_modules(kind):
    model, _, task = make(kind)
    suffixes, n_attn = EXPECTED_SITES[kind]
    houlsby = layers(peftx.get_peft_model(twin(model), config(task, "houlsby")))
    pfeiffer = layers(peftx.get_peft_model(twin(model), config(task, "pfeiffer")))
    table = PLACEMENT_TABLE[kind]
    ffn_suffix, = table["ffn"]

    def suffix_of(name):
        return max((s for s in suffixes if name.endswith("." + s)), key=len)
    assert {suffix_of(n) for n in houlsby} == suffixes
    assert {suffix_of(n) for n in pfeiffer} == {ffn_suffix}
    assert len(houlsby) - len(pfeiffer) == n_attn
    assert set(pfeiffer) < set(houlsby)


def _record(store, key, pick):
    """A hook that stores ``pick(hook args)`` under ``key`` the first time it runs (and returns None)."""
    def hook(*args):
        store.setdefault(key, pick(*args))
    return hook


def _capture(layer):
    """Hooks recording, for one site: the sublayer module's input, the base projection's output and the
    wrapped layer's output."""
    seen = {}
    handles = [
        layer._input_module.register_forward_pre_hook(
            _record(seen, "x", lambda m, a, kw: kw.get("hidden_states", a[0] if a else None)), with_kwargs=True),
        layer.base_layer.register_forward_hook(_record(seen, "h", lambda m, a, out: out)),
        layer.register_forward_hook(_record(seen, "out", lambda m, a, out: out)),
    ]
    return seen, handles


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_adapter_output_is_added_where_documented(kind, form):
    """out = h + f(h) (sequential) or h + f(x) (parallel), with h the projection's output and x the
    sublayer's input, and that sum is what the sublayer hands to its residual add (for BERT: what
    enters the LayerNorm together with the residual)."""
    model, inputs, task = make(kind)
    pm = peftx.get_peft_model(twin(model), config(task, "houlsby", form))
    mc.randomize_adapter(pm)
    for name, layer in layers(pm).items():
        seen, handles = _capture(layer)
        checks = {}
        parent = pm.get_submodule(name.rpartition(".")[0])
        if kind == "bert":  # BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + input_tensor)
            handles.append(parent.register_forward_pre_hook(_record(checks, "residual", lambda m, a: a[1])))
            handles.append(parent.LayerNorm.register_forward_pre_hook(_record(checks, "ln_in", lambda m, a: a[0])))
        else:  # the sublayer module's output (first element for attention) is the adapted projection
            handles.append(layer._input_module.register_forward_hook(
                _record(checks, "sub_out", lambda m, a, out: out[0] if isinstance(out, tuple) else out)))
        logits(pm, inputs)
        for h in handles:
            h.remove()
        src = seen["h"] if form == "sequential" else seen["x"]
        f = layer.adapter_output(src, "default")
        assert f.abs().max() > 0
        torch.testing.assert_close(seen["out"], seen["h"] + f, atol=0, rtol=0)
        if kind == "bert":
            torch.testing.assert_close(checks["ln_in"], seen["out"] + checks["residual"], atol=0, rtol=0)
        else:
            torch.testing.assert_close(checks["sub_out"], seen["out"], atol=0, rtol=0)


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "silu", "tanh"])
def test_adapter_function(non_linearity):
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, config(task, "pfeiffer", non_linearity=non_linearity, scaling=0.5))
    mc.randomize_adapter(pm)
    layer = next(iter(layers(pm).values()))
    down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
    assert down.weight.shape == (32 // 4, 32) and up.weight.shape == (32, 32 // 4)
    act = {"relu": torch.relu, "gelu": nn.functional.gelu, "swish": nn.functional.silu,
           "silu": nn.functional.silu, "tanh": torch.tanh}[non_linearity]
    z = torch.randn(3, 5, 32)
    expected = 0.5 * (act(z @ down.weight.t() + down.bias) @ up.weight.t() + up.bias)
    torch.testing.assert_close(layer.adapter_output(z, "default"), expected)


def test_bottleneck_size_overrides_reduction_factor():
    model, _, task = make("gpt2")
    pm = peftx.get_peft_model(model, peftx.AdapterConfig(task_type=task, bottleneck_size=5))
    for layer in layers(pm).values():
        assert layer.bottleneck_down["default"].weight.shape == (5, 32)


# --- adapter management ----------------------------------------------------------------------------
def test_named_adapters_disable_and_delete(tmp_path):
    model, inputs, task = make("llama")
    ref = logits(model, inputs)
    pm = peftx.get_peft_model(twin(model), config(task, "houlsby"))
    mc.randomize_adapter(pm, seed=1)
    pm.add_adapter("other", config(task, "pfeiffer", "parallel"))
    out_default = logits(pm, inputs)
    pm.set_adapter("other")
    assert torch.equal(logits(pm, inputs), ref)  # "other" is at its init
    mc.randomize_adapter(pm, seed=2)  # only the active adapter's parameters train
    out_other = logits(pm, inputs)
    assert not torch.equal(out_default, out_other) and not torch.equal(out_other, ref)
    with pm.disable_adapter():
        assert torch.equal(logits(pm, inputs), ref)
    assert torch.equal(logits(pm, inputs), out_other)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)

    pm.save_pretrained(tmp_path)
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "other")
    assert torch.equal(logits(back, inputs), out_other)
    back.load_adapter(tmp_path, "first")
    back.set_adapter("first")
    assert torch.equal(logits(back, inputs), out_default)

    pm.delete_adapter("other")
    assert pm.active_adapter == "default"
    assert torch.equal(logits(pm, inputs), out_default)
    assert not any(m._forward_pre_hooks for m in pm.modules()), "the parallel adapter's input hook outlived it"


def test_parallel_model_survives_deepcopy():
    model, inputs, task = make("t5")
    pm = peftx.get_peft_model(model, config(task, "houlsby", "parallel"))
    mc.randomize_adapter(pm)
    clone = copy.deepcopy(pm)
    assert torch.equal(logits(clone, inputs), logits(pm, inputs))


def test_layers_to_transform():
    model, _, task = make("llama")
    pm = peftx.get_peft_model(model, config(task, "houlsby", layers_to_transform=[1]))
    assert sorted(layers(pm)) == ["base_model.model.model.layers.1.mlp.down_proj",
                                  "base_model.model.model.layers.1.self_attn.o_proj"]


def test_file_format(tmp_path):
    import json

    from safetensors.torch import load_file
    model, _, task = make("bert")
    pm = peftx.get_peft_model(model, config(task, "pfeiffer"))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["placement"] == "pfeiffer" and cfg["form"] == "sequential"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    layer0 = "base_model.model.bert.encoder.layer.0.output.dense"
    assert {f"{layer0}.bottleneck_down.weight", f"{layer0}.bottleneck_down.bias", f"{layer0}.bottleneck_up.weight",
            f"{layer0}.bottleneck_up.bias"} <= keys
    assert not any("attention" in k for k in keys)
    assert any(k.startswith("base_model.model.classifier.") for k in keys)  # the SEQ_CLS head is saved


# --- models peftx has no table for, and bad arguments ------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.ff = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.ff(x)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_unknown_architecture_needs_module_names():
    with pytest.raises(ValueError, match="no placement table.*pass ffn_modules"):
        peftx.get_peft_model(Toy(), peftx.AdapterConfig(placement="pfeiffer"))
    with pytest.raises(ValueError, match="houlsby.*pass attn_modules.*placement='pfeiffer'"):
        peftx.get_peft_model(Toy(), peftx.AdapterConfig(ffn_modules={"ff.2": "ff"}))


@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_explicit_module_names(form):
    torch.manual_seed(0)
    toy, x = Toy(), torch.randn(2, 3, 8)
    ref = toy(x)
    cfg = peftx.AdapterConfig(attn_modules=["mix"], ffn_modules={"ff.2": "ff"}, reduction_factor=2, form=form)
    pm = peftx.get_peft_model(copy.deepcopy(toy), cfg)
    assert sorted(layers(pm)) == [f"base_model.model.blocks.{i}.{s}" for i in (0, 1) for s in ("ff.2", "mix")]
    assert torch.equal(pm(x), ref)
    mc.randomize_adapter(pm)
    assert not torch.equal(pm(x), ref)


def test_placement_the_architecture_lacks():
    model, _, task = make("llama")
    with pytest.raises(ValueError, match="after attention.*matched no module.*close names.*placement='pfeiffer'"):
        peftx.get_peft_model(model, config(task, "houlsby", attn_modules=["o_prj"]))
    with pytest.raises(ValueError, match="is a LlamaMLP.*output projection"):
        peftx.get_peft_model(model, config(task, "pfeiffer", ffn_modules=["mlp"]))
    with pytest.raises(ValueError, match="sublayer input module.*does not exist"):
        peftx.get_peft_model(model, config(task, "pfeiffer", "parallel", ffn_modules={"mlp.down_proj": "ffn"}))


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction_factor=0), "reduction_factor must be a positive number"),
    (dict(reduction_factor=-2), "reduction_factor must be a positive number"),
    (dict(reduction_factor="16"), "reduction_factor must be a positive number"),
    (dict(bottleneck_size=0), "bottleneck_size must be a positive integer"),
    (dict(non_linearity="softmax"), r"non_linearity must be one of \['relu', 'gelu', 'swish', 'silu', 'tanh'\]"),
    (dict(placement="after_ffn"), "placement must be one of"),
    (dict(form="serial"), "form must be one of"),
    (dict(adapter_dropout=1.0), "adapter_dropout must be in"),
    (dict(ffn_modules=[]), "ffn_modules must be a non-empty list"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        peftx.AdapterConfig(**kwargs)


def test_reduction_factor_larger_than_hidden():
    model, _, task = make("llama")
    with pytest.raises(ValueError, match="reduction_factor 64 leaves no bottleneck for hidden size 32.*at most 32"):
        peftx.get_peft_model(model, peftx.AdapterConfig(task_type=task, reduction_factor=64))


def test_low_precision_base_keeps_identity_and_fp32_adapters():
    model, inputs, task = make("llama")
    model = model.to(torch.bfloat16)
    pm = mc.check_identity_at_init(model, inputs, config(task, "houlsby", "parallel"))
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "bottleneck_" in n)
    mc.randomize_adapter(pm)
    assert logits(pm, inputs).dtype == torch.bfloat16


def test_mixed_adapter_batches_are_refused():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, config(task))
    with pytest.raises(ValueError, match="adapter_names.*not supported by BOTTLENECK"):
        pm(**inputs, adapter_names=["default", "default"])


def test_nf4_base_layers():
    model, inputs, task = make("llama")
    model = peftx.quantize_model(model, compute_dtype=torch.float32)
    pm = mc.check_identity_at_init(model, inputs, config(task, "houlsby", "parallel"))
    assert all(isinstance(m.base_layer, peftx.Linear4bit) for m in layers(pm).values())
    mc.check_training_moves_every_adapter_param(pm, inputs)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_parallel_adapters_under_gradient_checkpointing():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), config(task, "houlsby", "parallel"))
    mc.randomize_adapter(pm)
    pm.train()
    pm(**inputs).logits.pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm(**inputs).logits.pow(2).mean().backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_cuda_matches_cpu(form):
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), config(task, "houlsby", form))
    mc.randomize_adapter(pm)
    ref = logits(pm, inputs)
    pm = pm.cuda()
    out = logits(pm, {k: v.cuda() for k, v in inputs.items()})
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    pm(**{k: v.cuda() for k, v in inputs.items()}).logits.pow(2).mean().backward()
    grads = [p.grad for n, p in pm.named_parameters() if "bottleneck_" in n]
    assert grads and all(g is not None and g.is_cuda and g.abs().sum() > 0 for g in grads)
