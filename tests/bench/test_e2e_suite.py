"""The e2e bench suite on a scaled-down Llama: every variant builds and trains (adapters only, the same
trainable count on both sides), the figures are sane, peftx ops are found by the profiler, the table
prints, and the suite runs its variants in subprocesses."""

import pytest
import torch

from peftx.bench import e2e_suite

pytestmark = pytest.mark.usefixtures("isolated_rng")

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def test_every_variant_trains_and_reports():
    measured = {name: e2e_suite.measure(key, steps=1, warmup=0, profile=key.startswith("peftx"), tiny=True)
                for name, key in e2e_suite.KEYS.items()}
    counts = {m["trainable"] for m in measured.values()}
    # r=16 on the seven projections of 2 layers of hidden 64: the same adapter on every side.
    assert counts == {2 * 16 * (4 * (64 + 64) + 3 * (64 + 128))}, counts
    for name, m in measured.items():
        assert m["median_s"] > 0 and m["tokens_per_s"] == pytest.approx(4 * 256 / m["median_s"])
        assert m["start_MiB"] > 100 and m["peak_MiB"] >= m["start_MiB"] * 0.9, m
        if name.startswith("peftx"):
            assert 0 < m["peftx_fraction"] < 1 and m["peftx_op_s"] > 0, m
    rows = e2e_suite.rows_from(measured)
    by = {r["variant"]: r for r in rows}
    assert by["HF PEFT + bnb 4bit"]["x_tokens_per_s"] == 1.0 and by["HF PEFT LoRA bf16"]["x_peak"] == 1.0
    text = e2e_suite.table(rows)
    assert "peftx QLoRA" in text and "target: peftx QLoRA >= 1.2x HF PEFT + bnb tokens/s" in text


def test_peftx_op_seconds_counts_outermost_peftx_ops_once():
    import peftx
    layer = peftx.LoraLinear4bit.from_linear(torch.nn.Linear(64, 32), r=4, compute_dtype=torch.float32)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.profiler.profile() as prof:
        layer(x).sum().backward()
    names = {e.name for e in prof.events() if e.name.startswith("peftx::")}
    assert {"peftx::lora_linear_fwd", "peftx::lora_linear_bwd"} <= names, names
    total = sum(e.time_range.elapsed_us() for e in prof.events() if e.name.startswith("peftx::")) / 1e6
    assert 0 < e2e_suite.peftx_op_seconds(prof) <= total


def test_run_uses_one_subprocess_per_variant(monkeypatch):
    calls = []

    def fake(key, steps, warmup, tiny=False):
        calls.append((key, steps, warmup))
        return {"variant": key, "step_s": [1.0] * steps, "median_s": 1.0, "tokens_per_s": 1024.0,
                "peak_MiB": 1000.0 if key.startswith("hf") else 800.0, "start_MiB": 500.0, "threads": 2}
    monkeypatch.setattr(e2e_suite, "_run_child", fake)
    ticks = []
    rows = e2e_suite.run(quick=True, progress=lambda: ticks.append(1))
    assert [c[0] for c in calls] == list(e2e_suite.KEYS.values()) and all(c[1:] == (3, 1) for c in calls)
    assert len(ticks) == 4 and next(r for r in rows if r["variant"] == "peftx QLoRA")["x_peak"] == 0.8
