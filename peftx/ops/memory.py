"""Host memory for long-lived tensors: ``huge_page_clone`` (schema in csrc/registration.cpp, kernel in
csrc/common/huge_alloc.cpp) copies a tensor into memory backed by 2 MiB pages on the CPU (from 4 MiB
up, on Linux with transparent huge pages in ``madvise`` or ``always`` mode). The packed NF4 weights
live there: their strided passes otherwise pay a page walk per 4 KiB page once other work has
evicted the page-table entries."""

from __future__ import annotations

import torch

from peftx._native import _C  # noqa: F401  (registers the ops)

ops = torch.ops.peftx


def huge_page_clone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` (same dtype, shape and device); on the CPU in 2 MiB-page memory."""
    return ops.huge_page_clone(t)


@torch.library.register_fake("peftx::huge_page_clone")
def _(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)
