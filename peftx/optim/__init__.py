"""Fused AdamW optimizers: AdamW, AdamW8bit, and their paged variants, whose state lives in a page
pool with a resident budget (CPU: file-backed pages; CUDA: managed memory)."""

from peftx.optim.adamw import AdamW, AdamW8bit
from peftx.optim.paged import PagedAdamW, PagedAdamW8bit

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]
