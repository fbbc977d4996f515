"""PagedAdamW and PagedAdamW8bit: AdamW / AdamW8bit whose state lives in a page pool with a resident
budget (torch.classes.peftx.PagePool, csrc/optim/page_pool.*).

CPU parameters: the state is paged to a file in ``page_dir`` (default: the system temp directory);
at most ``resident_bytes`` of it is in memory at any time, the rest is on disk. CUDA parameters: the
state is CUDA managed memory; at most ``resident_bytes`` of it is kept on the device, the rest is
advised back to host memory. ``resident_bytes=None`` sets no budget (the pages move only under the
operating system's or the driver's memory pressure).

A step with a budget walks the state in windows of a sixth of the budget: each window's pages are
made resident (evicting the least recently used), the next three windows' are prefetched
asynchronously, the window is updated by one fused call, and its pages start writing back while the
next windows are updated. Successive steps walk
the windows in alternating order, so the pages still resident from one step are the first used by
the next. The update of each element does not depend on the order, so results are bit-identical to
the unpaged optimizers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import torch

from peftx.ops.optim import QUANT_BLOCK, adamw8bit_step, adamw_step, quant_blocks
from peftx.optim.adamw import AdamW, AdamW8bit
from peftx.optim.state import fields

MIN_RESIDENT_BYTES = 64 * 1024
WINDOWS_PER_BUDGET = 6
PREFETCH_WINDOWS = 3
_OS_PAGE = os.sysconf("SC_PAGESIZE")


def default_page_bytes(resident_bytes: int) -> int:
    """1/64 of the budget, between one OS page and 2 MiB."""
    pb = min(2 << 20, resident_bytes // 64)
    return max(_OS_PAGE, pb // _OS_PAGE * _OS_PAGE)


class _Segment:
    """Elements [a, b) of one parameter: its slices of param, grad and state."""

    __slots__ = ("param", "grad", "state", "step", "eight_bit")

    def __init__(self, p: torch.Tensor, state: dict, a: int, b: int):
        self.param = p.view(-1)[a:b]
        self.grad = p.grad.reshape(-1)[a:b]
        self.step = state["step"]
        self.eight_bit = "exp_avg_codes" in state
        if self.eight_bit:
            qa, qb = a // QUANT_BLOCK, quant_blocks(b)
            self.state = [state["exp_avg_codes"].view(-1)[a:b], state["exp_avg_absmax"][qa:qb],
                          state["exp_avg_sq_codes"].view(-1)[a:b], state["exp_avg_sq_absmax"][qa:qb]]
        else:
            self.state = [state["exp_avg"].view(-1)[a:b], state["exp_avg_sq"].view(-1)[a:b]]


class _Pages:
    """Which pool pages a tensor covers (for planning windows within the budget)."""

    def __init__(self, pool, page_bytes: int):
        self.arenas = [(a[0], a[0] + a[1]) for a in pool.arenas()]
        self.page_bytes = page_bytes

    def of(self, t: torch.Tensor) -> set:
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return set()
        addr = t.data_ptr()
        for k, (lo, hi) in enumerate(self.arenas):
            if lo <= addr < hi:
                first, last = (addr - lo) // self.page_bytes, (addr + nbytes - 1 - lo) // self.page_bytes
                return {(k, pg) for pg in range(first, last + 1)}
        raise RuntimeError("paged optimizer: a state tensor is not in its page pool")


class _PagedMixin:
    """State in a PagePool per device; windowed updates under a resident budget."""

    def _paged_init(self, page_dir, resident_bytes, page_bytes) -> None:
        name = type(self).__name__
        if resident_bytes is not None:
            resident_bytes = int(resident_bytes)
            if resident_bytes < MIN_RESIDENT_BYTES:
                raise ValueError(f"{name}: resident_bytes must be None (no budget) or at least {MIN_RESIDENT_BYTES}, "
                                 f"got {resident_bytes}")
        if page_bytes is None:
            page_bytes = default_page_bytes(resident_bytes) if resident_bytes else 2 << 20
        page_bytes = int(page_bytes)
        if page_bytes <= 0 or page_bytes % _OS_PAGE:
            raise ValueError(f"{name}: page_bytes must be a positive multiple of {_OS_PAGE}, got {page_bytes}")
        if resident_bytes is not None and resident_bytes // page_bytes < 16:
            raise ValueError(f"{name}: resident_bytes ({resident_bytes}) must hold at least 16 pages of page_bytes "
                             f"({page_bytes})")
        self.page_dir = os.fspath(page_dir) if page_dir is not None else tempfile.gettempdir()
        self.resident_bytes = resident_bytes
        self.page_bytes = page_bytes
        self._pools: dict[str, object] = {}
        self._flip = False
        self._trim_before_step = False
        devices = {p.device for g in self.param_groups for p in g["params"]}
        for d in devices:
            self._pool(d)  # a bad page_dir (or device) is an error now, not at the first step

    def _pool(self, device: torch.device):
        key = str(device)
        if key not in self._pools:
            if device.type == "cuda" and device.index is None:
                key = f"cuda:{torch.cuda.current_device()}"
            try:
                self._pools[key] = torch.classes.peftx.PagePool(self.page_dir, self.resident_bytes or 0,
                                                                 self.page_bytes, key)
            except RuntimeError as e:
                raise ValueError(f"{type(self).__name__}: cannot page optimizer state on {key}: "
                                 f"{str(e).splitlines()[0]}") from e
        return self._pools[key]

    def pool_stats(self, device: str | torch.device = "cpu") -> dict[str, int]:
        """The page pool's counters for ``device`` (bytes: page, budget, capacity, allocated, hot,
        peak_hot, stored (written to the backing store: spilled), loaded (brought back))."""
        return dict(self._pool(torch.device(device)).stats())

    def _alloc_state(self, p: torch.Tensor, eight_bit: bool) -> dict[str, torch.Tensor]:
        # One pool buffer per state tensor (whole OS pages each), so every storage has one dtype
        # and torch.save can write the state in place.
        if not p.is_contiguous():
            raise ValueError(f"{type(self).__name__}: paged state needs contiguous parameters, got one with strides "
                             f"{p.stride()}")
        pool = self._pool(p.device)
        return {f.name: pool.alloc(max(f.nbytes, 1))[:f.nbytes].view(f.dtype).view(f.shape) for f in fields(p, eight_bit)}

    def _window_pages(self) -> int:
        """Pages per window: a sixth of the budget, so that while one window is updated the next
        PREFETCH_WINDOWS are read ahead and the ones before it are still being written, all within the
        budget."""
        return max(4, self.resident_bytes // self.page_bytes // WINDOWS_PER_BUDGET)

    def _max_chunk(self, eight_bit: bool) -> int:
        """Elements per segment so that one segment's state fits in a window."""
        window_pages = self._window_pages()
        if eight_bit:  # two code ranges of 1 byte/element (+1 page each for misalignment) + two small absmax ranges
            per_range = (window_pages // 2 - 2) * self.page_bytes
            return max(QUANT_BLOCK, per_range // QUANT_BLOCK * QUANT_BLOCK)
        per_range = (window_pages // 2 - 1) * self.page_bytes  # two float32 ranges
        return max(1, per_range // 4)

    def _windows(self, pool, params: list[torch.Tensor]) -> list[list[_Segment]]:
        pages = _Pages(pool, self.page_bytes)
        limit = self._window_pages()
        windows, cur, cur_pages = [], [], set()
        for p in params:
            state = self.state[p]
            n = p.numel()
            chunk = self._max_chunk("exp_avg_codes" in state)
            for a in range(0, n, chunk):
                seg = _Segment(p, state, a, min(n, a + chunk))
                seg_pages = set().union(*(pages.of(t) for t in seg.state))
                if cur and len(cur_pages | seg_pages) > limit:
                    windows.append(cur)
                    cur, cur_pages = [], set()
                cur.append(seg)
                cur_pages |= seg_pages
        if cur:
            windows.append(cur)
        return windows

    @staticmethod
    def _run(segments: list[_Segment], hyper: dict) -> None:
        for eight_bit in (False, True):
            segs = [s for s in segments if s.eight_bit == eight_bit]
            if not segs:
                continue
            ps, gs, steps = [s.param for s in segs], [s.grad for s in segs], [s.step for s in segs]
            if eight_bit:
                adamw8bit_step(ps, gs, *[[s.state[k] for s in segs] for k in range(4)], steps, **hyper)
            else:
                adamw_step(ps, gs, [s.state[0] for s in segs], [s.state[1] for s in segs], steps, **hyper)

    def _update(self, params: list[torch.Tensor], hyper: dict) -> None:
        if self._trim_before_step:
            for pool in self._pools.values():
                pool.trim()
            self._trim_before_step = False
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for device, ps in by_device.items():
            steps = list({id(self.state[p]["step"]): self.state[p]["step"] for p in ps}.values())
            torch._foreach_add_(steps, 1.0)
            if not self.resident_bytes:
                self._run([_Segment(p, self.state[p], 0, p.numel()) for p in ps], hyper)
                continue
            pool = self._pool(device)
            windows = self._windows(pool, ps)
            if self._flip:
                windows.reverse()
            for k, w in enumerate(windows):
                views = [t for s in w for t in s.state]
                pool.acquire(views)
                ahead = [t for w2 in windows[k + 1:k + 1 + PREFETCH_WINDOWS] for s in w2 for t in s.state]
                if ahead:
                    pool.prefetch(ahead)
                self._run(w, hyper)
                if k + 1 < len(windows):  # the last window stays resident: the next step starts with it
                    pool.release(views)
        self._flip = not self._flip

    def state_dict(self) -> dict:
        """The state (tensors in the page pool, read in place by torch.save). Reading them pages them
        in outside the pool's accounting, so the next step first writes back and drops every page."""
        self._trim_before_step = True
        return super().state_dict()

    def _load_param_state(self, index: int, p: torch.Tensor, saved: dict) -> dict:
        state = self._alloc_state(p, self._uses_8bit(p))
        pool = self._pool(p.device)
        for k, dst in state.items():
            flat, src = dst.view(-1), saved[k].reshape(-1)
            # Copy in pieces that fit the budget.
            chunk = flat.numel() if not self.resident_bytes else max(
                1, (self.resident_bytes // 2 - 2 * self.page_bytes) // flat.element_size())
            for a in range(0, flat.numel(), chunk):
                piece = flat[a:a + chunk]
                if self.resident_bytes:
                    pool.acquire([piece])
                piece.copy_(src[a:a + chunk])
                if self.resident_bytes:
                    pool.release([piece])
        state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
        return state


class PagedAdamW(_PagedMixin, AdamW):
    """AdamW with paged float32 state (see the module docstring).

    Args: as AdamW, plus page_dir=None (CPU page files' directory; default: the temp directory),
    resident_bytes=None (budget of state in memory / on the device; None: no budget), page_bytes=None
    (residency unit; default: 1/64 of the budget, at most 2 MiB).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, maximize: bool = False,
                 page_dir: str | os.PathLike | None = None, resident_bytes: int | None = None,
                 page_bytes: int | None = None):
        AdamW.__init__(self, params, lr, betas, eps, weight_decay, maximize=maximize)
        self._paged_init(page_dir, resident_bytes, page_bytes)


class PagedAdamW8bit(_PagedMixin, AdamW8bit):
    """AdamW8bit with paged state (see the module docstring). Args: as PagedAdamW, plus min_8bit_size."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, maximize: bool = False,
                 min_8bit_size: int = 4096, page_dir: str | os.PathLike | None = None,
                 resident_bytes: int | None = None, page_bytes: int | None = None):
        AdamW8bit.__init__(self, params, lr, betas, eps, weight_decay, maximize=maximize, min_8bit_size=min_8bit_size)
        self._paged_init(page_dir, resident_bytes, page_bytes)


