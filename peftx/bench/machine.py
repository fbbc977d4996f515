"""The machine's measured limits, printed before any benchmark: DRAM read bandwidth, matmul peaks,
CPU features, threads."""

from __future__ import annotations

import platform

import torch

from peftx import _native
from peftx.bench.timing import interleaved


def measure(quick: bool = True) -> dict:
    threads = torch.get_num_threads()
    n = (256 if quick else 1024) * 2**20 // 4  # fp32 elements: 256 MiB, far beyond L3
    big = torch.ones(n)
    t = interleaved({"read": lambda: big.sum()}, repeats=5)["read"]
    read_gbs = big.numel() * 4 / (t.median_ms * 1e-3) / 1e9
    del big
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dtype)
        tt = interleaved({"mm": lambda: a @ a}, repeats=3)["mm"]
        peaks[str(dtype).removeprefix("torch.")] = 2 * 2048**3 / (tt.median_ms * 1e-3) / 1e9
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "features": {k: v for k, v in _native.cpu_features().items() if v},
        "dram_read_GBps": read_gbs,
        "matmul_peak_GFLOPs": peaks,
        "torch": torch.__version__,
        "peftx_cuda_kernels": _native.cuda_built(),
    }


def describe(m: dict) -> str:
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in m["matmul_peak_GFLOPs"].items())
    return (f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, peftx CUDA kernels built: "
            f"{m['peftx_cuda_kernels']}\n  features: {' '.join(sorted(m['features']))}\n"
            f"  DRAM read (torch.sum over 256 MiB fp32): {m['dram_read_GBps']:.1f} GB/s\n"
            f"  matmul 2048^3 (torch): {peaks}")
