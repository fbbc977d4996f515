"""The promises every PEFT method makes, as reusable checks (each method's test module calls them with
its own configs): identity at init, training lowers the loss and moves every adapter parameter,
save/load reproduces outputs exactly, merge matches the unmerged model, trainable-parameter counts
equal HF PEFT's, and files move both ways with HF PEFT."""

from __future__ import annotations

import torch

import peftx
from tests.integration.tiny_models import logits, twin


def check_identity_at_init(model, inputs, config, atol=0.0):
    ref = logits(model, inputs)
    pm = peftx.get_peft_model(twin(model), config)
    torch.testing.assert_close(logits(pm, inputs), ref, atol=atol, rtol=0)
    return pm


def _loss(pm, inputs, target):
    return (pm(**inputs).logits.float() - target).pow(2).mean()


def check_training_moves_every_adapter_param(pm, inputs, steps=8, lr=1e-2, on_step=None, **forward_kwargs):
    """Regresses the logits onto a fixed random target with AdamW (dropout off, so the loss is a
    deterministic function of the parameters); asserts the loss went down and every trainable
    parameter changed. ``on_step(step)`` runs after each optimizer step, before the next zero_grad
    (AdaLoRA's update_and_allocate)."""
    pm.eval()
    with torch.no_grad():
        shape = pm(**inputs, **forward_kwargs).logits.shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert params, "the method has no trainable parameter"
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(pm, {**inputs, **forward_kwargs}, target)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(len(losses))
        losses.append(loss.item())
    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters that never changed: {unchanged[:5]}"
    assert losses[-1] < losses[0], losses
    return losses


def check_save_load_exact(pm, model, inputs, tmp_path):
    """Saves, reloads onto a fresh copy of the base model, and compares outputs bit for bit."""
    pm.eval()
    ref = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path)
    torch.testing.assert_close(logits(back, inputs), ref, atol=0, rtol=0)
    return back


def check_merge_matches(pm, inputs, atol=1e-5, rtol=1e-5):
    ref = logits(pm, inputs)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), ref, atol=atol, rtol=rtol)


def check_unload_and_disable(model, inputs, config, prefixes):
    """With non-zero adapters (config's init_weights=False), disable_adapter() computes the base model's
    logits exactly and unload() returns the untouched base with no module named by `prefixes` left."""
    pm = peftx.get_peft_model(twin(model), config)
    assert not torch.equal(logits(pm, inputs), logits(model, inputs))
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, inputs), logits(model, inputs), atol=0, rtol=0)
    plain = pm.unload()
    assert not any(n.startswith(prefixes) for name, _ in plain.named_modules() for n in name.split("."))
    torch.testing.assert_close(logits(plain, inputs), logits(model, inputs), atol=0, rtol=0)


def check_bf16_model_keeps_fp32_factors_as_hf(model, inputs, ours_config, hf_config, prefix):
    """On a bf16 model the adapter factors (parameters whose names contain `prefix`) stay fp32, every
    parameter has HF PEFT's dtype, and the output at init is the base model's."""
    import peft
    ours = peftx.get_peft_model(twin(model), ours_config)
    theirs = peft.get_peft_model(twin(model), hf_config)
    assert {p.dtype for n, p in ours.named_parameters() if prefix in n} == {torch.float32}
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    torch.testing.assert_close(logits(ours, inputs), logits(model, inputs), atol=0, rtol=0)


def check_trainable_params_equal_hf(model, ours_config, hf_config):
    import peft
    ours = peftx.get_peft_model(twin(model), ours_config)
    theirs = peft.get_peft_model(twin(model), hf_config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def randomize_adapter(pm, seed=0):
    """Moves every trainable parameter away from its init (so files carry non-trivial values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def check_hf_round_trip(model, inputs, ours_config, hf_config, tmp_path, atol=1e-6, rtol=1e-5):
    """peftx -> HF PEFT and HF PEFT -> peftx: the same saved adapter gives the same outputs."""
    import peft
    ours = peftx.get_peft_model(twin(model), ours_config)
    randomize_adapter(ours, seed=1)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(hf, inputs), logits(ours, inputs), atol=atol, rtol=rtol)

    theirs = peft.get_peft_model(twin(model), hf_config)
    randomize_adapter(theirs, seed=2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "hf")
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(back, inputs), logits(theirs, inputs), atol=atol, rtol=rtol)
