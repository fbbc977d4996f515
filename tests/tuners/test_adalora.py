"""AdaLoRA: the shared method promises, its rank allocation against HF PEFT's RankAllocator (same
weights and gradients -> same budget and masks), the orthogonality regulariser, the fused forward's
gradients, and rank_pattern files in both directions."""

import peft
import pytest
import torch

import peftx
from peftx.tuners.adalora import AdaLoraConfig, AdaLoraLinear
from tests.integration.tiny_models import logits, make, twin
from tests.tuners import method_checks as mc

SCHEDULE = dict(init_r=4, target_r=3, tinit=1, tfinal=2, deltaT=1, total_step=8)


def _labels(kind, inputs):
    return inputs["input_ids"] if kind in ("llama", "gpt2") else torch.tensor([0, 2])


def _train(pm, inputs, labels, steps, allocate, lr=1e-2, seed=0):
    """Trains on the model's own loss (orth regulariser included) calling AdaLoRA's allocation as
    documented: backward, step, update_and_allocate, zero_grad."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        pm(**inputs, labels=labels).loss.backward()
        opt.step()
        allocate(step)
        opt.zero_grad()


def _strip(pattern, adapter="default"):
    return {k.removesuffix(f".{adapter}"): v for k, v in pattern.items()}


def _check_save_load(pm, model, inputs, tmp_path):
    """The file holds only the kept triplets (rank_pattern), so the reloaded model sums over fewer
    ranks than the trained one, whose pruned triplets are zero: equal up to the summation order over
    r, and bit for bit once the trained model is shrunk the same way."""
    pm.eval()
    trained = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    torch.testing.assert_close(logits(back, inputs), trained, atol=1e-6, rtol=1e-6)
    pm.base_model.before_loading_tensors("default")
    assert any(m.adapters["default"].r < SCHEDULE["init_r"] for m in pm.modules() if isinstance(m, AdaLoraLinear))
    torch.testing.assert_close(logits(back, inputs), logits(pm, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_adalora_keeps_the_method_promises(kind, tmp_path):
    model, inputs, task = make(kind)
    config = AdaLoraConfig(task_type=task, lora_alpha=8, **SCHEDULE)
    pm = mc.check_identity_at_init(model, inputs, config)
    mc.check_training_moves_every_adapter_param(pm, inputs, steps=SCHEDULE["total_step"],
                                                on_step=pm.base_model.update_and_allocate)
    pattern = pm.peft_config["default"].rank_pattern
    assert pattern and not all(all(v) for v in pattern.values()), "the schedule masked nothing"
    _check_save_load(pm, model, inputs, tmp_path)
    mc.check_merge_matches(pm, inputs)
    mc.check_trainable_params_equal_hf(model, AdaLoraConfig(task_type=task, **SCHEDULE),
                                       peft.AdaLoraConfig(task_type=task, **SCHEDULE))
    mc.check_hf_round_trip(model, inputs, AdaLoraConfig(task_type=task, **SCHEDULE),
                           peft.AdaLoraConfig(task_type=task, **SCHEDULE), tmp_path)


def test_adalora_on_gpt2_conv1d_round_trips_with_hf(tmp_path):
    model, inputs, task = make("gpt2")
    pm = mc.check_identity_at_init(model, inputs, AdaLoraConfig(task_type=task, **SCHEDULE))
    assert isinstance(pm.base_model.model.transformer.h[0].attn.c_attn, AdaLoraLinear)
    mc.check_hf_round_trip(model, inputs, AdaLoraConfig(task_type=task, **SCHEDULE),
                           peft.AdaLoraConfig(task_type=task, **SCHEDULE), tmp_path)


def _twins(kind, **overrides):
    """A peftx and an HF PEFT AdaLoRA model on the same base with the same adapter values."""
    model, inputs, task = make(kind)
    kw = dict(task_type=task, **{**SCHEDULE, **overrides})
    ours = peftx.get_peft_model(twin(model), AdaLoraConfig(**kw))
    theirs = peft.get_peft_model(twin(model), peft.AdaLoraConfig(**kw))
    mc.randomize_adapter(ours, seed=3)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs, inputs, _labels(kind, inputs)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_forward_loss_and_gradients_equal_hf(kind):
    ours, theirs, inputs, labels = _twins(kind, orth_reg_weight=0.5)
    ours.train(), theirs.train()
    torch.manual_seed(0)
    lo = ours(**inputs, labels=labels).loss
    torch.manual_seed(0)
    lt = theirs(**inputs, labels=labels).loss
    torch.testing.assert_close(lo, lt, atol=1e-6, rtol=1e-6)
    lo.backward(), lt.backward()
    grads = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-6, rtol=1e-4, msg=n)


def test_orth_reg_value_equals_hf():
    ours, theirs, inputs, labels = _twins("llama")
    for weight in (0.0, 0.5, 2.0):
        ours.peft_config["default"].orth_reg_weight = weight
        theirs.peft_config["default"].orth_reg_weight = weight
        lo, lt = ours(**inputs, labels=labels).loss, theirs(**inputs, labels=labels).loss
        torch.testing.assert_close(lo, lt, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        base = theirs.base_model.model(**inputs, labels=labels).loss
    reg = ours.base_model.orth_reg_loss()
    torch.testing.assert_close(base + 2.0 * reg, lt, atol=1e-6, rtol=1e-6)
    assert reg.item() > 0


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_update_and_allocate_matches_hf_rank_allocator(kind):
    """Same weights and the same gradients every step: the same budget, masks and masked E."""
    ours, theirs, inputs, labels = _twins(kind, init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=14)
    theirs_params = dict(theirs.named_parameters())
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    cfg_o, cfg_t = ours.peft_config["default"], theirs.peft_config["default"]
    masked_steps = 0
    for step in range(cfg_o.total_step + 2):
        ours(**inputs, labels=labels).loss.backward()
        opt.step()
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if p.requires_grad:
                    theirs_params[n].copy_(p)
                    theirs_params[n].grad = p.grad.clone()
        before = cfg_o.rank_pattern
        ours.base_model.update_and_allocate(step)
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
        masked_steps += cfg_o.rank_pattern is not before
        if cfg_t.rank_pattern is None:
            assert cfg_o.rank_pattern is None
        else:
            assert cfg_o.rank_pattern == _strip(cfg_t.rank_pattern), f"step {step}"
        for n, p in ours.named_parameters():
            if ".lora_E." in n:
                assert torch.equal(p, theirs_params[n]), f"step {step}: {n}"
        assert ours.base_model.rankallocator.budget_schedule(step) == theirs.base_model.rankallocator.budget_schedule(step)
    assert masked_steps >= 3


def test_budget_reaches_target_r_on_average():
    model, inputs, task = make("llama")
    config = AdaLoraConfig(task_type=task, init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10)
    pm = peftx.get_peft_model(model, config)
    alloc = pm.base_model.rankallocator
    n = len(alloc.layers)
    budgets = [alloc.budget_schedule(s)[0] for s in range(config.total_step + 1)]
    assert budgets[0] == 6 * n and budgets[-1] == 2 * n
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), budgets
    _train(pm, inputs, _labels("llama", inputs), config.total_step + 2, pm.base_model.update_and_allocate)
    kept = [sum(v) for v in config.rank_pattern.values()]
    assert sum(kept) / n == config.target_r
    live = [int((m.lora_E["default"] != 0).sum()) for m in alloc.layers.values()]
    assert live == kept


def test_rank_pattern_round_trip_with_hf(tmp_path):
    model, inputs, task = make("llama")
    kw = dict(task_type=task, init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8)
    labels = _labels("llama", inputs)
    # peftx -> HF PEFT
    ours = peftx.get_peft_model(twin(model), AdaLoraConfig(**kw))
    _train(ours, inputs, labels, 10, ours.base_model.update_and_allocate)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path / "ours").eval()
    assert _strip(hf.peft_config["default"].rank_pattern) == ours.peft_config["default"].rank_pattern
    shrunk = [m.r["default"] for m in hf.modules() if hasattr(m, "lora_E")]
    assert shrunk == [sum(v) for v in ours.peft_config["default"].rank_pattern.values()]
    torch.testing.assert_close(logits(hf, inputs), logits(ours, inputs), atol=1e-6, rtol=1e-5)
    # HF PEFT -> peftx
    theirs = peft.get_peft_model(twin(model), peft.AdaLoraConfig(**kw))
    _train(theirs, inputs, labels, 10, theirs.base_model.update_and_allocate)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "hf")
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "hf").eval()
    assert back.peft_config["default"].rank_pattern == _strip(theirs.peft_config["default"].rank_pattern)
    assert [m.r["default"] for m in back.modules() if isinstance(m, AdaLoraLinear)] == \
        [sum(v) for v in back.peft_config["default"].rank_pattern.values()]
    torch.testing.assert_close(logits(back, inputs), logits(theirs, inputs), atol=1e-6, rtol=1e-5)


def test_dropout_training_runs_through_the_fused_op():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, AdaLoraConfig(task_type=task, lora_dropout=0.3, **SCHEDULE))
    mc.randomize_adapter(pm)
    pm.train()
    torch.manual_seed(0)
    a = pm(**inputs, labels=inputs["input_ids"]).loss
    torch.manual_seed(0)
    b = pm(**inputs, labels=inputs["input_ids"]).loss
    pm.eval()
    c = pm(**inputs, labels=inputs["input_ids"]).loss
    assert a.item() == b.item() and a.item() != c.item()
    a.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


def test_disable_adapter_and_unload_give_the_base():
    model, inputs, task = make("llama")
    ref = logits(model, inputs)
    pm = peftx.get_peft_model(twin(model), AdaLoraConfig(task_type=task, **SCHEDULE))
    mc.randomize_adapter(pm)
    assert not torch.allclose(logits(pm, inputs), ref)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, inputs), ref, atol=0, rtol=0)
    torch.testing.assert_close(logits(pm.unload(), inputs), ref, atol=0, rtol=0)


def test_one_trainable_adapter_and_no_weighted_adapters():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, AdaLoraConfig(task_type=task, **SCHEDULE))
    with pytest.raises(ValueError, match="one adapter at a time"):
        pm.add_adapter("second", AdaLoraConfig(task_type=task, **SCHEDULE))
    pm.add_adapter("frozen", AdaLoraConfig(task_type=task, inference_mode=True, **SCHEDULE))
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".frozen" in n)
    with pytest.raises(TypeError, match="add_weighted_adapter"):
        pm.base_model.add_weighted_adapter(["default"], [1.0], "w")
    with pytest.raises(ValueError, match="mixed-adapter"):
        pm(**inputs, adapter_names=["default", "frozen"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=10, tinit=5, tfinal=5), "tinit"),
    (dict(total_step=10, init_r=4, target_r=6), "target_r"),
    (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, beta2=0.0), "beta2"),
    (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
    (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, init_r=0), "init_r"),
    (dict(total_step=10, target_modules="q_proj", layers_to_transform=[0]), "layers_to_transform"),
    (dict(total_step=10, layers_pattern="layers"), "layers_pattern"),
])
def test_bad_configs_name_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(**kwargs)


def test_r_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(r=4, total_step=10)


def test_update_and_allocate_before_backward_is_a_clear_error():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, AdaLoraConfig(task_type=task, **SCHEDULE))
    with pytest.raises(RuntimeError, match="after loss.backward"):
        pm.base_model.update_and_allocate(0)


def test_unsupported_target_is_a_clear_error():
    model, inputs, task = make("llama")
    with pytest.raises(ValueError, match="not supported by AdaLoRA"):
        peftx.get_peft_model(model, AdaLoraConfig(task_type=task, target_modules=["embed_tokens"], **SCHEDULE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_and_gradients_equal_the_svd_formula(device, dtype):
    """The fused path (A' = A * E through peftx::lora_linear_fwd) against the plain formula, on every
    device the build has; dropout off."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 10).to(device, dtype)
    layer = AdaLoraLinear(base, r=5, lora_alpha=6)
    with torch.no_grad():
        for d in (layer.lora_A, layer.lora_E, layer.lora_B):
            d["default"].normal_()
    x = torch.randn(3, 7, 24, device=device, dtype=dtype)
    y = layer(x)
    A, E, B = (d["default"] for d in (layer.lora_A, layer.lora_E, layer.lora_B))
    leaves = [t.detach().clone().requires_grad_(True) for t in (A, E, B)]
    ref = base(x).float() + (x.float() @ (leaves[0] * leaves[1]).t() @ leaves[2].t()) * 6 / (5 + 1e-5)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), ref, **tol)
    g = torch.randn_like(ref)
    y.float().backward(g)
    ref.backward(g)
    for p, q in zip((A, E, B), leaves):
        # bf16: the op's intermediates round to bf16, so the tolerance follows the gradient's magnitude.
        scale = 1.0 if dtype == torch.float32 else max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, atol=tol["atol"] * scale, rtol=tol["rtol"])


def test_rank_zero_modules_load_both_ways(tmp_path):
    """An allocation may remove every singular value of a module (HF PEFT then writes [0, in] tensors)."""
    model, inputs, task = make("llama")
    kw = dict(task_type=task, **SCHEDULE)
    theirs = peft.get_peft_model(twin(model), peft.AdaLoraConfig(**kw))
    mc.randomize_adapter(theirs, seed=4)
    names = [n for n, _ in theirs.base_model.model.named_parameters() if ".lora_E." in n]
    pattern = {n: [i % 2 == 0 for i in range(SCHEDULE["init_r"])] for n in names}
    pattern[names[1]] = [False] * SCHEDULE["init_r"]
    with torch.no_grad():
        for n, p in theirs.base_model.model.named_parameters():
            if n in pattern:
                p.masked_fill_(~torch.tensor(pattern[n]).view(-1, 1), 0.0)
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.eval()
    theirs.save_pretrained(tmp_path / "hf")
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "hf").eval()
    ranks = [m.r["default"] for m in back.modules() if isinstance(m, AdaLoraLinear)]
    assert 0 in ranks and ranks.count(SCHEDULE["init_r"] // 2) == len(ranks) - 1
    torch.testing.assert_close(logits(back, inputs), logits(theirs, inputs), atol=1e-6, rtol=1e-5)
    back.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(twin(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(again, inputs), logits(theirs, inputs), atol=1e-6, rtol=1e-5)
    mc.check_save_load_exact(back, model, inputs, tmp_path / "exact")
