"""PagedAdamW / PagedAdamW8bit: bit-identical to the unpaged optimizers under a 10% budget; the
state's resident memory (/proc/self/smaps, mincore) stays within the budget plus one page during and
after steps; spilled state really goes to the page file; no leaked mappings; save/load; bad page
directories, a full disk, and CUDA managed memory."""

import ctypes
import gc
import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import peftx.optim as popt
from peftx import _native

# LoRA-like: many small tensors, plus a few large ones and odd sizes.
SHAPES = [(16, 256), (256, 16)] * 20 + [(300_000,), (512, 520), (1000,), (7,)]
OS_PAGE = os.sysconf("SC_PAGESIZE")


def _params(seed=0, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _steps(opt, params, n, seed=1, during=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        opt.step()
        if during:
            during()


def _state_bytes(cls_unpaged, shapes=SHAPES, **kw):
    ps = _params(shapes=shapes)
    opt = cls_unpaged(ps, **kw)
    _steps(opt, ps, 1)
    return opt.state_bytes()


def _mapping_rss(pool) -> int:
    """Rss (bytes) of this process's mappings inside the pool's arenas, from /proc/self/smaps (a
    resident range is anonymous memory, an evicted one a mapping of the page file: both count)."""
    arenas = [(a[0], a[0] + a[1]) for a in pool.arenas()]
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = any(a <= lo and hi <= b for a, b in arenas)
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


_libc = ctypes.CDLL(None, use_errno=True)


def _mincore_bytes(pool) -> int:
    """Bytes of the page file's pages in memory (page cache), over the pool's mappings."""
    total = 0
    for addr, length, _ in pool.arenas():
        vec = (ctypes.c_ubyte * (length // OS_PAGE))()
        assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
        total += sum(v & 1 for v in vec) * OS_PAGE
    return total


def _write_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


@pytest.mark.parametrize("paged_cls,cls", [(popt.PagedAdamW, popt.AdamW), (popt.PagedAdamW8bit, popt.AdamW8bit)])
def test_bit_identical_to_unpaged_with_a_10_percent_budget(tmp_path, paged_cls, cls):
    budget = _state_bytes(cls) // 10
    ps, ref = _params(), _params()
    groups = lambda p: [{"params": p[:30]}, {"params": p[30:], "lr": 3e-3, "weight_decay": 0.0}]
    opt = paged_cls(groups(ps), lr=1e-2, page_dir=tmp_path, resident_bytes=budget)
    ref_opt = cls(groups(ref), lr=1e-2)
    _steps(opt, ps, 5)
    _steps(ref_opt, ref, 5)
    for a, b in zip(ps, ref):
        assert torch.equal(a, b)
        for k, v in ref_opt.state[b].items():
            assert torch.equal(opt.state[a][k], v), k
    stats = opt.pool_stats()
    assert stats["budget_bytes"] <= budget and stats["peak_hot_bytes"] <= stats["budget_bytes"]
    assert stats["stored_bytes"] > 4 * opt.state_bytes()  # the state really went through the disk


def test_resident_memory_stays_within_budget_and_spill_goes_to_the_file(tmp_path):
    budget = _state_bytes(popt.AdamW) // 10
    ps = _params()
    opt = popt.PagedAdamW(ps, lr=1e-2, page_dir=tmp_path, resident_bytes=budget)
    pool = opt._pool(torch.device("cpu"))
    limit = budget + opt.page_bytes
    samples, stop = [], threading.Event()

    # Measured around every window's update (the moments of most residency: the window resident,
    # the next one loading, the previous ones storing) and by a sampler thread, with mincore over the
    # arena: one call walks its page tables under the mm lock, so each reading is consistent while
    # the pool's I/O threads remap ranges. After each step smaps too, the smaller of two reads
    # (reading smaps is not atomic: a range remapped in the middle of a read can be counted twice).
    def sample():
        while not stop.is_set():
            samples.append(_mincore_bytes(pool))

    def rss():
        return min(_mapping_rss(pool), _mapping_rss(pool))

    run = opt._run

    def measured_run(window, hyper):
        samples.append(_mincore_bytes(pool))
        run(window, hyper)
        samples.append(_mincore_bytes(pool))

    opt._run = measured_run
    after = []
    _steps(opt, ps, 1)  # state allocated
    pool.reset_stats()
    written0 = _write_bytes()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        _steps(opt, ps, 4, during=lambda: after.append((rss(), _mincore_bytes(pool))))
    finally:
        stop.set()
        sampler.join()
    written = _write_bytes() - written0
    stats = opt.pool_stats()
    assert len(samples) >= 100 and max(samples) <= limit, (len(samples), max(samples), limit)
    assert max(samples) >= budget // 2  # the measurement sees the windows
    assert all(rss <= limit and cached <= limit for rss, cached in after), (after, limit)
    assert stats["peak_hot_bytes"] <= budget
    # Spilled bytes were written (the kernel counts this process's writes to the file's pages) ...
    assert stats["stored_bytes"] >= 3 * opt.state_bytes()
    assert written >= stats["stored_bytes"], (written, stats["stored_bytes"])
    # ... and the file holds the state: drop everything, read the file itself, compare.
    pool.trim()
    assert _mapping_rss(pool) == 0 and _mincore_bytes(pool) == 0
    arenas = pool.arenas()
    for p in ps[::7]:
        for name in ("exp_avg", "exp_avg_sq"):
            t = opt.state[p][name]
            base, _, offset = next(a for a in arenas if a[0] <= t.data_ptr() < a[0] + a[1])
            raw = os.pread(pool.fd(), t.numel() * 4, offset + t.data_ptr() - base)
            assert raw == t.numpy().tobytes()


def test_no_budget_and_zig_zag_order_give_the_same_result(tmp_path):
    ps, ref = _params(), _params()
    opt = popt.PagedAdamW8bit(ps, lr=1e-2, page_dir=tmp_path)  # resident_bytes=None: no budget
    ref_opt = popt.AdamW8bit(ref, lr=1e-2)
    _steps(opt, ps, 3)
    _steps(ref_opt, ref, 3)
    assert all(torch.equal(a, b) for a, b in zip(ps, ref))
    assert opt.pool_stats()["stored_bytes"] == 0


def test_no_leaked_pages_mappings_or_files(tmp_path):
    ps = _params(shapes=[(1000, 100), (64, 64)])
    opt = popt.PagedAdamW(ps, page_dir=tmp_path, resident_bytes=200_000)
    _steps(opt, ps, 2)
    pool = opt._pool(torch.device("cpu"))
    path, fd = pool.path(), pool.fd()
    assert os.listdir(tmp_path) == []  # the page file is unlinked at creation
    with open("/proc/self/maps") as f:
        assert path in f.read()
    # A state tensor outliving the optimizer keeps its pages mapped ...
    kept = opt.state[ps[0]]["exp_avg"].clone()
    survivor = opt.state[ps[1]]["exp_avg"]
    del opt, pool
    gc.collect()
    with open("/proc/self/maps") as f:
        assert path in f.read()
    assert survivor.sum().item() == survivor.sum().item()
    del survivor
    gc.collect()
    # ... and once the last one is gone, nothing is left: no mapping, no descriptor.
    with open("/proc/self/maps") as f:
        assert path not in f.read()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert kept.numel() == 100_000


def test_save_restart_load_continues_identically(tmp_path):
    import io
    ps = _params()
    budget = _state_bytes(popt.AdamW8bit) // 10
    opt = popt.PagedAdamW8bit(ps, lr=1e-2, page_dir=tmp_path, resident_bytes=budget)
    _steps(opt, ps, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_params = [p.detach().clone() for p in ps]
    _steps(opt, ps, 3, seed=4)
    assert opt.pool_stats()["peak_hot_bytes"] <= budget
    for cls, kw in ((popt.PagedAdamW8bit, dict(page_dir=tmp_path, resident_bytes=budget)), (popt.AdamW8bit, {})):
        ps2 = [torch.nn.Parameter(t.clone()) for t in saved_params]
        opt2 = cls(ps2, lr=1e-2, **kw)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf, weights_only=True))
        _steps(opt2, ps2, 3, seed=4)
        assert all(torch.equal(a, b) for a, b in zip(ps, ps2)), cls.__name__


def test_bad_page_dir(tmp_path):
    ps = _params(shapes=[(10,)])
    with pytest.raises(ValueError, match=r"PagedAdamW: cannot page optimizer state on cpu: .*cannot create a page "
                                         r"file in '.*missing': No such file or directory"):
        popt.PagedAdamW(ps, page_dir=tmp_path / "missing")
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="Not a directory"):
        popt.PagedAdamW(ps, page_dir=afile)
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        unwritable = ro
    else:  # root writes anywhere a mode allows; a read-only file system refuses even root
        unwritable = "/sys"
        if os.access("/sys", os.W_OK) and not _sys_refuses_files():
            pytest.skip("no unwritable directory available to root here")
    with pytest.raises(ValueError, match=r"cannot create a page file .*(Permission denied|Read-only file system)"):
        popt.PagedAdamW(ps, page_dir=unwritable)


def _sys_refuses_files():
    try:
        fd = os.open("/sys/peftx-probe", os.O_CREAT | os.O_WRONLY)
    except OSError:
        return True
    os.close(fd)
    os.unlink("/sys/peftx-probe")
    return False


def test_bad_budget_arguments(tmp_path):
    ps = _params(shapes=[(10,)])
    with pytest.raises(ValueError, match="resident_bytes must be None .* or at least 65536"):
        popt.PagedAdamW(ps, page_dir=tmp_path, resident_bytes=1000)
    with pytest.raises(ValueError, match="page_bytes must be a positive multiple of"):
        popt.PagedAdamW(ps, page_dir=tmp_path, resident_bytes=1 << 20, page_bytes=1000)
    with pytest.raises(ValueError, match="must hold at least 16 pages"):
        popt.PagedAdamW(ps, page_dir=tmp_path, resident_bytes=1 << 20, page_bytes=512 << 10)


def test_full_disk_is_a_clear_error_and_leaves_params_untouched(tmp_path):
    # A file size limit (RLIMIT_FSIZE) stands in for a full disk: the page file cannot grow past 1 MiB.
    script = textwrap.dedent(f"""
        import resource, signal, torch
        import peftx.optim as popt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        ps = [torch.nn.Parameter(torch.randn(100, 100)), torch.nn.Parameter(torch.randn(1000, 1000))]
        opt = popt.PagedAdamW(ps, page_dir={str(tmp_path)!r}, resident_bytes=1 << 20)
        before = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad = torch.ones_like(p)
        try:
            opt.step()
        except RuntimeError as e:
            print("ERROR:", e)
        assert all(torch.equal(p, b) for p, b in zip(ps, before)), "parameters changed"
        assert not any(opt.state[p] for p in ps), "partial state left behind"
        print("UNTOUCHED")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "UNTOUCHED" in out.stdout
    reserved = re.search(r"cannot reserve (\d+) bytes for optimizer state in '(.*)': ", out.stdout)
    assert reserved and int(reserved.group(1)) >= 4_000_000 and reserved.group(2) == str(tmp_path)
    assert "File too large (the page directory is full or over its file size limit)" in out.stdout


def test_pool_rejects_foreign_tensors_and_oversized_windows(tmp_path):
    pool = torch.classes.peftx.PagePool(str(tmp_path), 64 * 4096, 4096, "cpu")
    buf = pool.alloc(100_000)
    assert buf.dtype == torch.uint8 and buf.numel() == 100_000 and (buf == 0).all()
    with pytest.raises(RuntimeError, match="not a buffer of this page pool"):
        pool.acquire([torch.zeros(10)])
    big = pool.alloc(65 * 4096)
    with pytest.raises(RuntimeError, match="exceeds the resident budget of 64 pages"):
        pool.acquire([big])
    del buf, big


cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and _native.cuda_built()),
                               reason="needs a CUDA GPU and a build with CUDA kernels")


@cuda_only
@pytest.mark.parametrize("paged_cls,cls", [(popt.PagedAdamW, popt.AdamW), (popt.PagedAdamW8bit, popt.AdamW8bit)])
def test_cuda_paged_state_is_managed_memory_and_bit_identical(paged_cls, cls):
    shapes = [(16, 1024), (1024, 16)] * 8 + [(2_000_000,)]
    ps = [p.cuda() for p in _params(shapes=shapes)]
    ps = [torch.nn.Parameter(p.detach()) for p in ps]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    budget = 4 << 20
    opt = paged_cls(ps, lr=1e-2, resident_bytes=budget)
    ref_opt = cls(ref, lr=1e-2)
    _steps(opt, ps, 4)
    _steps(ref_opt, ref, 4)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(ps, ref))
    stats = opt.pool_stats(ps[0].device)
    assert stats["stored_bytes"] > 0 and stats["peak_hot_bytes"] <= budget
    state = next(iter(opt.state.values()))
    assert state["step"].device.type == "cpu" and all(v.is_cuda for k, v in state.items() if k != "step")


@cuda_only
def test_cuda_pool_never_asks_for_more_than_the_free_memory():
    free, _ = torch.cuda.mem_get_info()
    pool = torch.classes.peftx.PagePool("", 0, 2 << 20, "cuda:0")
    with pytest.raises(RuntimeError, match="would exceed the .* bytes free on cuda:0"):
        pool.alloc(free + (1 << 30))
