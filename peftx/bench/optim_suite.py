"""The optim suite: one optimizer step over (a) the LoRA parameters of the small Llama of the
end-to-end benchmark (hidden 1024, intermediate 2816, 8 layers, r=16 on all seven projections: 112
small tensors, 2.5M parameters) and (b) 16.8M fp32 parameters in four large tensors. Candidates, all
in the same process with interleaved runs: torch.optim.AdamW (default, foreach, fused),
bitsandbytes' CPU AdamW / AdamW8bit, and peftx AdamW / AdamW8bit / PagedAdamW (resident budget 10% of
the fp32 state, pages in the system temp directory). Reported: median step time, ratio to torch
fused, achieved bandwidth (bytes the step must move / time), bytes of state per parameter, and for
PagedAdamW the bytes spilled per step and the disk bandwidth this suite measures (write + fsync,
drop the cache, read back) in the same directory."""

from __future__ import annotations

import logging
import mmap
import os
import statistics
import tempfile
import time
import warnings

import torch

import peftx.optim as popt
from peftx.bench.timing import interleaved

log = logging.getLogger(__name__)

HIDDEN, INTERMEDIATE, LAYERS, RANK = 1024, 2816, 8, 16
BIG_SHAPES = [(4096, 1024)] * 4  # 16.8M
# Bytes a step reads + writes per parameter: p r/w, g r, m r/w, v r/w (fp32 state); p r/w, g r, two
# uint8 codes r/w (8-bit state; absmax negligible).
BYTES_FP32_STATE = {torch.float32: 4 + 4 + 4 + 8 + 8}
BYTES_8BIT_STATE = {torch.float32: 4 + 4 + 4 + 2 + 2}


def lora_shapes() -> list[tuple[int, int]]:
    proj = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE)] * 2 + [(INTERMEDIATE, HIDDEN)]  # (in, out)
    shapes = []
    for _ in range(LAYERS):
        for fan_in, fan_out in proj:
            shapes += [(RANK, fan_in), (fan_out, RANK)]  # lora_A, lora_B
    return shapes


def measure_disk(directory: str, nbytes: int = 256 << 20, repeats: int = 3) -> dict:
    """Sequential write (+ fsync) and read bandwidth of a file in ``directory``, the way the page
    pool moves pages: O_DIRECT 8 MiB requests where the file system allows it (else buffered writes
    and reads of a dropped cache). Median of ``repeats`` runs after a warm-up run."""
    chunk = 8 << 20
    buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT wants
    buf.write(os.urandom(chunk))
    fd, path = tempfile.mkstemp(dir=directory, prefix="peftx-disk-")
    os.close(fd)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            direct = True
        except (OSError, AttributeError):
            fd, direct = os.open(path, os.O_RDWR), False
        writes, reads = [], []
        try:
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                for off in range(0, nbytes, chunk):
                    os.pwritev(fd, [buf], off)
                os.fsync(fd)
                writes.append(time.perf_counter() - t0)
                if not direct:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                for off in range(0, nbytes, chunk):
                    os.preadv(fd, [buf], off)
                reads.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
        buf.close()
    return {"write_GBps": nbytes / statistics.median(writes[1:]) / 1e9,
            "read_GBps": nbytes / statistics.median(reads[1:]) / 1e9, "direct_io": direct}


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        warnings.warn("bitsandbytes is not installed: its columns are skipped", stacklevel=2)
        return None
    return bnb


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and k not in ("step", "qmap1", "qmap2"))


def _case(name, shapes, repeats, page_dir, disk, bnb) -> dict:
    n = sum(torch.Size(s).numel() for s in shapes)
    fp32_state = 8 * n
    budget = fp32_state // 10
    makers = {
        "torch default": lambda ps: torch.optim.AdamW(ps, foreach=False),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "peftx AdamW": lambda ps: popt.AdamW(ps),
        "peftx AdamW8bit": lambda ps: popt.AdamW8bit(ps),
        "peftx PagedAdamW": lambda ps: popt.PagedAdamW(ps, page_dir=page_dir, resident_bytes=budget),
    }
    if bnb:
        makers["bnb AdamW"] = lambda ps: bnb.optim.AdamW(ps, optim_bits=32)
        makers["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps)
    opts = {k: make(_params(shapes)) for k, make in makers.items()}
    for o in opts.values():
        o.step()  # state allocated outside the timing
    paged = opts["peftx PagedAdamW"]
    pool = paged._pool(torch.device("cpu"))
    pool.reset_stats()
    timings = interleaved({k: o.step for k, o in opts.items()}, repeats)
    steps = repeats + 1  # interleaved() warms up once
    stats = paged.pool_stats()
    spilled = stats["stored_bytes"] / steps
    loaded = stats["loaded_bytes"] / steps
    base = timings["torch fused"].median_ms
    row = {"op": f"step {name[:3]}", "dtype": "float32", "M": None, "shape": f"{len(shapes)} tensors, {n / 1e6:.1f}M",
           "anchor": "torch fused", "results": {}}
    for k, t in timings.items():
        eight_bit = k.endswith("8bit")
        moved = n * (BYTES_8BIT_STATE if eight_bit else BYTES_FP32_STATE)[torch.float32]
        row["results"][k] = {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "spread": t.spread,
                             "x_vs_torch_fused": t.median_ms / base, "GBps": moved / (t.median_ms * 1e-3) / 1e9,
                             "state_bytes_per_param": _state_bytes(opts[k]) / n}
    unpaged = timings["peftx AdamW"].median_ms
    io_ms = (spilled / (disk["write_GBps"] * 1e9) + loaded / (disk["read_GBps"] * 1e9)) * 1e3
    row["paged"] = {"budget_bytes": budget, "spilled_bytes_per_step": spilled, "loaded_bytes_per_step": loaded,
                    "io_ms_at_disk_bw": io_ms, "bound_ms": unpaged + 1.5 * io_ms,
                    "peak_resident_bytes": stats["peak_hot_bytes"]}
    r = row["results"]
    row["notes"] = [
        f"{name}: {len(shapes)} tensors, {n / 1e6:.1f}M parameters",
        f"targets: peftx AdamW / torch fused = {r['peftx AdamW']['median_ms'] / base:.2f}x "
        f"({'<= 1.1x' if name.startswith('(b)') else '< 1x'} wanted); AdamW8bit / torch fused = "
        f"{r['peftx AdamW8bit']['median_ms'] / base:.2f}x (<= 3x), "
        f"{r['peftx AdamW8bit']['state_bytes_per_param']:.3f} B/param state (<= 2.1)",
        f"PagedAdamW: budget {budget / 2**20:.1f} MiB (10% of state), spilled {spilled / 2**20:.1f} MiB + loaded "
        f"{loaded / 2**20:.1f} MiB per step = {io_ms:.1f} ms at the disk bandwidth; bound unpaged + 1.5 x io = "
        f"{unpaged + 1.5 * io_ms:.1f} ms, measured {r['peftx PagedAdamW']['median_ms']:.1f} ms; peak resident "
        f"{stats['peak_hot_bytes'] / 2**20:.2f} MiB"]
    del opts
    return row


def run(quick: bool, progress) -> list[dict]:
    bnb = _bnb()
    page_dir = tempfile.gettempdir()
    disk = measure_disk(page_dir)
    log.info("disk (%s): write %.2f GB/s, read %.2f GB/s", page_dir, disk["write_GBps"], disk["read_GBps"])
    progress()
    repeats = 7 if quick else 21
    rows = []
    for name, shapes in (("(a) LoRA r=16", lora_shapes()), ("(b) 16.8M", BIG_SHAPES)):
        row = _case(name, shapes, repeats, page_dir, disk, bnb)
        row["disk"] = disk
        row["notes"].insert(0, f"disk ({page_dir}): write {disk['write_GBps']:.2f} GB/s, read "
                               f"{disk['read_GBps']:.2f} GB/s")
        rows.append(row)
        progress()
    return rows
