"""Run by test_ddp.py under torchrun (2 processes): rank 1 builds an adapter that differs from rank 0's
in one way per case; peftx.distributed.check_consistent must raise the same clear error on both ranks."""

import os
import sys

import torch
import torch.distributed as dist

import peftx
from peftx.distributed import check_consistent
from tests.integration.tiny_models import make

CASES = {
    "rank": (dict(r=8), dict(r=4)),  # different shapes: DDP itself would also object, less clearly
    "alpha": (dict(lora_alpha=16), dict(lora_alpha=32)),  # same shapes: DDP would train on silently
    "targets": (dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["q_proj", "k_proj"])),
    "blocksize": (dict(), dict()),  # same adapter, base quantized with another NF4 blocksize
}


def build(case: str, rank: int):
    model, _, _ = make("llama")
    blocksize = 128 if case == "blocksize" and rank == 1 else 64
    model = peftx.quantize_model(model, blocksize=blocksize, compute_dtype=torch.float32)
    kw = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    kw.update(CASES[case][min(rank, 1)])
    return peftx.get_peft_model(model, peftx.LoraConfig(**kw))


def main(out_dir: str) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    failures = 0
    lines = []
    try:
        digest = check_consistent(build("rank", 0))  # the same model everywhere passes
        lines.append(f"rank {rank} consistent {digest[:12]}")
        for case in CASES:
            try:
                check_consistent(build(case, rank))
            except ValueError as e:
                lines.append(f"rank {rank} case {case} raised: {e}")
            else:
                lines.append(f"rank {rank} case {case} did NOT raise")
                failures += 1
    finally:
        dist.destroy_process_group()
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:  # one file per rank: no interleaving
            f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # The result files are written and the process group destroyed. Skip the interpreter's teardown:
    # about one run in four, on torch 2.13 and 2.14 alike, a background thread left by the process
    # group aborted it ("terminate called without an active exception") after everything the test
    # checks had finished.
    os._exit(code)
