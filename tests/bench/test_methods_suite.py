"""The methods bench suite at a tiny size: every case builds and trains on both sides with the same
trainable-parameter count, the figures are sane, the LoKr layer row runs, and the table prints."""

import pytest

from peftx.bench import methods_suite

pytestmark = pytest.mark.usefixtures("isolated_rng")

pytest.importorskip("peft")


def test_every_case_trains_and_reports():
    ticks = []
    rows = methods_suite.run(quick=True, progress=lambda: ticks.append(1), tiny=True)
    assert len(rows) == len(ticks) == len(methods_suite.CASES) + 1
    assert [r["case"] for r in rows[:-1]] == [c.name for c in methods_suite.CASES]
    with_hf = {c.name for c in methods_suite.CASES if c.hf_config is not None} | {rows[-1]["case"]}
    for r in rows:
        assert r["peftx trainable"] > 0 and r["peftx ms"] > 0 and r["peftx peak MiB"] > 0, r
        if r["case"] not in with_hf:
            assert "HF PEFT ms" not in r, r
            continue
        assert r["peftx trainable"] == r["HF PEFT trainable"], r
        assert r["HF PEFT ms"] > 0 and r["HF PEFT peak MiB"] > 0, r
        assert r["x time"] == pytest.approx(r["peftx ms"] / r["HF PEFT ms"])
    text = methods_suite.table(rows)
    assert all(c.name in text for c in methods_suite.CASES) and "LoKr layer 64x64" in text


def test_a_case_without_hf_counterpart_reports_peftx_only():
    loha = next(c for c in methods_suite.CASES if c.name.startswith("LoHa"))
    case = methods_suite.Case("LoHa only", "llama", loha.peftx_config, None)
    row = methods_suite.measure_case(case, repeats=1, warmup=0, tiny=True)
    assert row["peftx trainable"] > 0 and "HF PEFT ms" not in row and "x time" not in row
    assert "LoHa only" in methods_suite.table([{**row, "threads": 1, "repeats": 1}])


def test_step_peak_counts_live_tensors():
    import torch

    def step():
        a = torch.ones(1024, 1024)   # 4 MiB
        b = a * 2                     # 4 MiB more, both live
        del a, b
    assert 7.9 < methods_suite.step_peak_MiB(step) < 9
