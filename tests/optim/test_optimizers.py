"""peftx.optim.AdamW / AdamW8bit as torch optimizers: torch.optim.AdamW's trajectory, bf16 params,
8-bit training and bitsandbytes' 8-bit Adam, state_dict round trips and interop, param groups, LR
schedulers, gradient clipping, bad input, and transformers' Trainer."""

import io

import pytest
import torch

import peftx.optim as popt
from peftx.ops.optim_reference import DYNAMIC_CODE, UNSIGNED_DYNAMIC_CODE, adamw_step_ref, dequantize_blockwise_ref

SHAPES = [(64, 48), (300,), (17, 33), (1,)]


def _params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _run(opt, params, steps, seed=1, grad_fn=None, hooks=()):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = grad_fn(p) if grad_fn else torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
        for h in hooks:
            h()


def _close_rel(got, want, rel):
    # Relative to the tensor's scale: per-element relative error is meaningless where want ~ 0.
    scale = want.abs().max()
    return (got - want).norm() <= rel * want.norm() and (got - want).abs().max() <= rel * scale


@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_matches_torch_adamw_200_steps(maximize):
    ours, theirs = _params(), _params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]
    opt = popt.AdamW(groups(ours), lr=1e-2, weight_decay=0.1, maximize=maximize)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.1, maximize=maximize)
    _run(opt, ours, 200)
    _run(ref, theirs, 200)
    for a, b in zip(ours, theirs):
        assert _close_rel(a.detach(), b.detach(), 1e-6)
        assert _close_rel(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"], 1e-6)
        assert opt.state[a]["step"].item() == ref.state[b]["step"].item() == 200


def test_adamw_bf16_params_fp32_state():
    """bf16 parameters with fp32 state. Every step equals the reference (fp32 math on the bf16 value,
    rounded to bf16 once). Stated tolerance over 200 steps (lr 1e-2) of a quadratic, against the
    fp32 trajectory of torch.optim.AdamW: mean |error| <= 0.05 and no worse than torch.optim.AdamW
    on the same bf16 parameters (whose state is bf16), max |error| at most one bf16 ulp (of 4) worse."""
    targets = [t.detach().float() for t in _params(seed=7)]
    by_shape = {tuple(t.shape): t for t in targets}
    quad = lambda p: (p.detach().float() - by_shape[tuple(p.shape)]).to(p.dtype)
    ours = _params(torch.bfloat16)
    opt = popt.AdamW(ours, lr=1e-2, weight_decay=0.01)
    # bitwise against the reference, step by step
    shadow = [p.detach().clone() for p in ours]
    m = [torch.zeros(p.shape) for p in ours]
    v = [torch.zeros(p.shape) for p in ours]
    for step in range(1, 201):
        for p in ours:
            p.grad = quad(p)
        grads = [p.grad.clone() for p in ours]
        opt.step()
        adamw_step_ref(shadow, grads, m, v, [torch.tensor(float(step))] * len(m), lr=1e-2, beta1=0.9, beta2=0.999,
                       eps=1e-8, weight_decay=0.01)
        assert all(torch.equal(p.detach(), s) for p, s in zip(ours, shadow))
    fp32, torch_bf16 = _params(), _params(torch.bfloat16)
    _run(torch.optim.AdamW(fp32, lr=1e-2, weight_decay=0.01), fp32, 200, grad_fn=quad)
    _run(torch.optim.AdamW(torch_bf16, lr=1e-2, weight_decay=0.01), torch_bf16, 200, grad_fn=quad)
    flat = lambda ps: torch.cat([p.detach().float().reshape(-1) for p in ps])
    err, torch_err = (flat(ours) - flat(fp32)).abs(), (flat(torch_bf16) - flat(fp32)).abs()
    assert err.mean() <= 0.05 and err.mean() <= torch_err.mean()
    assert err.max() <= torch_err.max() + 2.0 ** -6


def _train(cls, steps=200, **kw):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 8))
    opt = cls(model.parameters(), lr=3e-3, weight_decay=0.01, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(128, 32, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), teacher(x)).item(), opt


def test_adamw8bit_trains_to_the_fp32_loss():
    """Stated margin: the 8-bit state's held-out loss is within 5% of the fp32 state's (measured: 0.1%),
    and the loss fell by more than 10x from the untrained model's."""
    fp32_loss, _ = _train(popt.AdamW)
    int8_loss, opt = _train(popt.AdamW8bit)
    untrained, _ = _train(popt.AdamW, steps=0)
    assert sum("exp_avg_codes" in s for s in opt.state.values()) == 2  # the two 128-wide weights
    assert int8_loss <= 1.05 * fp32_loss
    assert int8_loss < untrained / 10
    weights = [p for p in opt.state if "exp_avg_codes" in opt.state[p]]
    n = sum(p.numel() for p in weights)
    bytes_8bit = sum(v.numel() * v.element_size() for p in weights for k, v in opt.state[p].items() if k != "step")
    assert bytes_8bit / n <= 2.1


def test_adamw8bit_close_to_bitsandbytes_cpu_adamw8bit():
    """Against bitsandbytes' own CPU AdamW8bit (same format and maps). bitsandbytes' CPU quantizer first
    snaps values to a 16-bit grid, peftx encodes to the nearest code, and the update's rounding order
    differs slightly, so: after 1 step the parameters agree to 1e-6, >= 99% of the m codes and >= 95%
    of the v codes are equal and the decoded moments differ by at most one code step (1.5% / 0.8% of
    the block absmax); after 10 steps the parameters agree to 5% of how far they moved."""
    bnb = pytest.importorskip("bitsandbytes")
    init = torch.randn(64, 257, generator=torch.Generator().manual_seed(0))
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = popt.AdamW8bit([a], lr=1e-2, weight_decay=0.1)
    theirs = bnb.optim.AdamW8bit([b], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 11):
        grad = torch.randn(init.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        if step == 1:
            sa, sb = ours.state[a], theirs.state[b]
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
            assert (sa["exp_avg_codes"] == sb["state1"]).float().mean() >= 0.99
            assert (sa["exp_avg_sq_codes"] == sb["state2"]).float().mean() >= 0.95
            assert torch.equal(sa["exp_avg_absmax"], sb["absmax1"])
            for codes, absmax, theirs_codes, code, tol in (
                    ("exp_avg_codes", "exp_avg_absmax", "state1", DYNAMIC_CODE, 0.015),
                    ("exp_avg_sq_codes", "exp_avg_sq_absmax", "state2", UNSIGNED_DYNAMIC_CODE, 0.008)):
                mine = dequantize_blockwise_ref(sa[codes], sa[absmax], code)
                other = dequantize_blockwise_ref(sb[theirs_codes], sa[absmax], code)
                assert (mine - other).abs().max() <= tol * sa[absmax].max()
    moved = (b.detach() - init).abs().max()
    assert (a - b).abs().max() <= 0.05 * moved


def test_second_moment_never_underflows_to_zero():
    # A block mixing gradients 1e3 apart: nearest rounding would send the small ones' v to 0 and the
    # next step would divide by eps. With the floor, every step stays lr-sized.
    p = torch.nn.Parameter(torch.zeros(512))
    opt = popt.AdamW8bit([p], lr=1e-2, weight_decay=0.0, min_8bit_size=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scale = torch.where(torch.arange(512) % 2 == 0, 1.0, 1e-4)
        p.grad = torch.randn(512, generator=g) * scale * torch.rand(512, generator=g)
        before = p.detach().clone()
        opt.step()
        assert (p.detach() - before).abs().max() < 0.1  # lr / (1 - beta1) bounds a healthy step
    assert (opt.state[p]["exp_avg_sq_codes"] > 0).all()


# --- state_dict -------------------------------------------------------------------------------

def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", [popt.AdamW, popt.AdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_restart_load_continues_identically(cls, dtype):
    shapes = [(64, 96), (300,), (5000,)]
    ps = _params(dtype, shapes=shapes)
    opt = cls([{"params": ps[:1]}, {"params": ps[1:], "lr": 2e-3}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _run(opt, ps, 5, hooks=[sched.step])
    saved_opt, saved_sched = _roundtrip(opt.state_dict()), _roundtrip(sched.state_dict())
    saved_params = [p.detach().clone() for p in ps]
    _run(opt, ps, 5, seed=9, hooks=[sched.step])
    # restart: new parameters, optimizer and scheduler from the saved state
    ps2 = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = cls([{"params": ps2[:1]}, {"params": ps2[1:], "lr": 2e-3}], lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    for s in opt2.state.values():  # state keeps its formats: fp32 moments, uint8 codes, CPU step
        assert s["step"].dtype == torch.float32 and s["step"].device.type == "cpu"
        assert all(v.dtype in (torch.float32, torch.uint8) for v in s.values())
    _run(opt2, ps2, 5, seed=9, hooks=[sched2.step])
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)


def test_loads_torch_adamw_state_and_continues_like_it():
    ps, theirs = _params(), _params()
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    _run(ref, theirs, 10)
    for p, t in zip(ps, theirs):
        p.data.copy_(t.data)
    opt = popt.AdamW(ps, lr=1e-2)
    opt.load_state_dict(_roundtrip(ref.state_dict()))
    _run(ref, theirs, 20, seed=5)
    _run(opt, ps, 20, seed=5)
    for a, b in zip(ps, theirs):
        assert _close_rel(a.detach(), b.detach(), 1e-6)


def test_load_state_dict_errors_name_the_problem():
    ps = _params(shapes=[(64, 96), (300,)])
    a32, a8 = popt.AdamW(ps), popt.AdamW8bit(ps)
    _run(a32, ps, 1)
    _run(a8, ps, 1)
    before = {k: v.clone() for k, v in a8.state[ps[0]].items()}
    with pytest.raises(ValueError, match=r"saved by a 32-bit optimizer"):
        a8.load_state_dict(a32.state_dict())
    assert all(torch.equal(before[k], a8.state[ps[0]][k]) for k in before)  # nothing changed
    with pytest.raises(ValueError, match=r"saved by an 8-bit optimizer"):
        a32.load_state_dict(a8.state_dict())
    other = _params(shapes=[(64, 95), (300,)])
    o = popt.AdamW(other)
    _run(o, other, 1)
    with pytest.raises(ValueError, match=r"parameter 0 .*6080 elements, expected 6144; the state_dict belongs to "
                                         r"a different parameter list"):
        a32.load_state_dict(o.state_dict())
    with pytest.raises(ValueError, match=r"has 2 parameter groups, this optimizer has 1"):
        a32.load_state_dict({"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]})
    with pytest.raises(ValueError, match=r"parameter group 0 has 1 parameters in the state_dict and 2 here"):
        a32.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})
    amsgrad = torch.optim.AdamW(_params(shapes=[(64, 96), (300,)]), amsgrad=True)
    _run(amsgrad, amsgrad.param_groups[0]["params"], 1)
    with pytest.raises(ValueError, match=r"amsgrad"):
        a32.load_state_dict(amsgrad.state_dict())


# --- torch.optim behaviour ----------------------------------------------------------------------

def test_scheduler_clipping_zero_grad_match_torch():
    ours, theirs = _params(), _params()
    opt, ref = popt.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    s1 = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=30)
    s2 = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=3e-2, total_steps=30)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        grads = [torch.randn(p.shape, generator=g) * 5 for p in ours]
        for o, t, gr in zip(ours, theirs, grads):
            o.grad, t.grad = gr.clone(), gr.clone()
        torch.nn.utils.clip_grad_norm_(ours, 1.0)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        opt.step()
        ref.step()
        s1.step()
        s2.step()
        opt.zero_grad()
        assert all(p.grad is None for p in ours)
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for a, b in zip(ours, theirs):
        assert _close_rel(a.detach(), b.detach(), 1e-6)


def test_params_without_grad_and_groups_added_later():
    ps = _params()
    opt = popt.AdamW8bit(ps[:2], lr=1e-2, min_8bit_size=100)
    ps[0].grad = torch.randn(ps[0].shape)
    opt.step()
    assert ps[1] not in opt.state or not opt.state[ps[1]]
    opt.add_param_group({"params": ps[2:], "lr": 1e-3})
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[ps[0]]["step"].item() == 2 and opt.state[ps[2]]["step"].item() == 1
    assert "exp_avg_codes" in opt.state[ps[2]] and "exp_avg" in opt.state[ps[3]]  # 561 >= 100 > 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1e-3), "lr must be"), (dict(eps=-1e-8), "eps must be"), (dict(betas=(1.0, 0.999)), "beta1 must be in"),
    (dict(betas=(0.9, -0.1)), "beta2 must be in"), (dict(weight_decay=-0.1), "weight_decay must be"),
    (dict(betas=(0.9,)), "betas must be a pair")])
@pytest.mark.parametrize("cls", [popt.AdamW, popt.AdamW8bit, popt.PagedAdamW, popt.PagedAdamW8bit])
def test_bad_hyperparameters(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(_params(), **kwargs)


def test_bad_hyperparameter_set_later_leaves_params_untouched():
    ps = _params()
    opt = popt.AdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2)
    _run(opt, ps, 1)
    before = [p.detach().clone() for p in ps]
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param group 1: lr must be a finite number >= 0, got -1.0"):
        _run(opt, ps, 1)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(opt.state[p]["step"].item() == 1 for p in ps)


def test_bad_params_and_grads():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        popt.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    p = torch.nn.Parameter(torch.zeros(3))
    opt = popt.AdamW([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients are not supported"):
        opt.step()
    assert not opt.state[p]


def test_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    opt = popt.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8,
                                          report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                                          max_grad_norm=1.0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert trainer.optimizer.optimizer is opt if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is opt
    assert all(s["step"].item() == 10 for s in opt.state.values())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 10 / 20))
