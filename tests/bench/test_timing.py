"""peftx.bench.timing: interleaved medians and the page faults each candidate takes per call."""

import sys

import pytest
import torch

from peftx.bench.timing import interleaved


@pytest.mark.skipif(sys.platform != "linux", reason="minor page faults are read from getrusage on Linux")
def test_page_faults_per_call_are_counted_per_candidate():
    kept = torch.empty(1 << 20)  # reused: no faults after the first touch
    kept.fill_(1.0)

    def fresh():  # 64 MiB from a new mmap every call (glibc: over 32 MiB), every page touched
        torch.ones(16 << 20)

    def reuse():
        kept.add_(1.0)

    t = interleaved({"fresh": fresh, "reuse": reuse}, repeats=5)
    assert t["fresh"].faults >= (64 << 20) // 4096 // 2  # 4 KiB pages (fewer if some are huge pages)
    assert t["reuse"].faults < 100
    assert t["fresh"].runs == t["reuse"].runs == 5 and t["fresh"].median_ms > 0
