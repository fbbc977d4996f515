"""DistributedDataParallel (gloo, 2 CPU processes of one thread, started with torchrun): LoRA and QLoRA
adapters trained by 2 processes on halves of each global batch equal those of 1 process on the whole
batch; processes that built different adapters get a clear error before training."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import peftx
from peftx.distributed import check_consistent, fingerprint
from tests.integration.tiny_models import make

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "ddp_lora.py")

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
              pytest.mark.usefixtures("isolated_rng")]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_train_the_same_adapters_as_one(tmp_path):
    # SGD with momentum: gradients that agree to the last bits give weights that agree to 1e-8. (With AdamW
    # the weights here agree to ~7e-7: its normalized step turns last-bit differences of near-zero
    # gradients into differences of up to the learning rate.)
    common = ["--method", "lora", "qlora", "--optimizer", "sgd", "--lr", "0.05", "--steps", "4",
              "--global-batch", "4"]
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}"
        res = torchrun(nproc, EXAMPLE, *common, "--out", str(out))
        assert res.returncode == 0, res.stderr[-4000:]
        assert f"{nproc} processes agree on the adapter setup" in res.stderr
        runs[nproc] = out
    for method in ("lora", "qlora"):
        one = load_file(runs[1] / method / "adapter_model.safetensors")
        two = load_file(runs[2] / method / "adapter_model.safetensors")
        assert one.keys() == two.keys() and len(one) == 2 * 7 * 2
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=0, msg=f"{method} {k}")
        # The adapters trained (B starts at zero; after 4 SGD steps its entries reach 1e-4 to 1e-2).
        assert all(one[k].abs().max() > 2e-5 for k in one if "lora_B" in k)


def test_processes_with_different_adapters_get_a_clear_error(tmp_path):
    res = torchrun(2, os.path.join(ROOT, "tests", "integration", "ddp_mismatch_worker.py"), str(tmp_path))
    out = "".join((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1) if (tmp_path / f"rank{r}.txt").exists())
    assert res.returncode == 0, out + res.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} consistent" in out
    expected = {"rank": "adapters.default.r: 8 vs 4", "alpha": "adapters.default.lora_alpha: 16 vs 32",
                "targets": "adapters.default.target_modules: ['q_proj', 'v_proj'] vs ['q_proj', 'k_proj']",
                "blocksize": "nf4_layers (14 vs 14 entries"}
    for case, detail in expected.items():
        for rank in (0, 1):
            line = next(ln for ln in out.splitlines() if ln.startswith(f"rank {rank} case {case} "))
            assert "raised: peftx.distributed.check_consistent: the processes disagree" in line, line
            assert "rank 1 differs from rank 0" in line and detail in line, line


def test_check_consistent_needs_an_initialized_process_group():
    model, _, _ = make("llama")
    pm = peftx.get_peft_model(model, peftx.LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        check_consistent(pm)


def test_fingerprint_covers_what_ddp_does_not_compare():
    def build(**kw):
        model, _, _ = make("llama")
        return peftx.get_peft_model(model, peftx.LoraConfig(task_type="CAUSAL_LM", **kw))
    a = fingerprint(build(lora_alpha=8))
    assert a == fingerprint(build(lora_alpha=8))
    assert a["trainable"] == fingerprint(build(lora_alpha=16))["trainable"]  # same shapes...
    assert a != fingerprint(build(lora_alpha=16))  # ...but not the same adapter
    assert a != fingerprint(build(lora_dropout=0.1))
    ddp_like = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(ddp_like)
    ddp_like.module = build(lora_alpha=8)
    assert fingerprint(ddp_like) == a
