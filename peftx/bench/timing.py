"""Interleaved timing: candidates run in turn (A B C A B C ...) so drift hits all of them alike.

Each call's minor page faults are counted too: a candidate that takes fresh memory every call (a
tensor of more than 32 MiB always comes from a new mmap under glibc's defaults) pays a fault per
4 KiB page, whose cost on a VM moves with the host's load, so its time moves with it."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

if sys.platform != "win32":
    import resource

    def _minor_faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
else:  # pragma: no cover
    def _minor_faults() -> int:
        return 0


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    faults: float = 0.0  # median minor page faults per call (the whole process's, during the call)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
            faults[name].append(_minor_faults() - f0)
    return {k: Timing(statistics.median(v), _quantile(v, 0.1), _quantile(v, 0.9), len(v), statistics.median(faults[k]))
            for k, v in samples.items()}
