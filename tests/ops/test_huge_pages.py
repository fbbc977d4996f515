"""huge_page_clone and the 2 MiB-page memory of the packed NF4 weights (csrc/common/huge_alloc.cpp)."""

import resource
import sys

import pytest
import torch

import peftx
from peftx.ops.memory import huge_page_clone
from peftx.ops.reference import nf4_quantize_ref

LINUX = sys.platform.startswith("linux")
MIB = 1 << 20


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(3, 5), (0,), (5 * MIB // 4 + 3, 1)])
def test_clone_is_an_independent_contiguous_copy(dtype, shape):
    t = (torch.randn(shape) * 50).to(dtype)
    c = huge_page_clone(t)
    assert c.dtype == dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
    if t.numel():
        assert c.data_ptr() != t.data_ptr()
        t.view(-1)[0] += 1
        assert not torch.equal(c, t)


def test_clone_of_a_non_contiguous_view():
    t = torch.randn(64, 40)[:, ::3]
    c = huge_page_clone(t)
    assert c.is_contiguous() and torch.equal(c, t)


@pytest.mark.skipif(not LINUX, reason="2 MiB-aligned mappings are made on Linux only")
def test_large_tensors_start_on_a_huge_page_boundary():
    assert huge_page_clone(torch.zeros(4 * MIB, dtype=torch.uint8)).data_ptr() % (2 * MIB) == 0
    # The packed codes of a 4096 x 2048 weight (4 MiB) come from the same allocator.
    weight = torch.randn(4096, 2048)
    packed, absmax = torch.ops.peftx.nf4_quantize(weight, 64)
    assert packed.data_ptr() % (2 * MIB) == 0
    want_packed, want_absmax = nf4_quantize_ref(weight, 64)
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)


@pytest.mark.skipif(not LINUX, reason="ru_maxrss in KiB is Linux's convention")
def test_freed_clones_give_their_memory_back():
    t = torch.ones(8 * MIB, dtype=torch.uint8)
    for _ in range(3):
        huge_page_clone(t)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(40):  # 320 MiB in all if the mappings leaked
        c = huge_page_clone(t)
        assert int(c[-1]) == 1
        del c
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 64 * 1024, f"peak RSS grew by {grown} KiB"


def test_nf4_weight_loading_and_moving_copy_the_codes():
    w = peftx.NF4Weight.quantize(torch.randn(64, 96))
    sd = w.to_bnb_state_dict("lin.")
    back = peftx.NF4Weight.from_bnb_state_dict(sd, "lin.")
    assert torch.equal(back.packed, w.packed)
    assert back.packed.untyped_storage().data_ptr() != sd["lin.weight"].untyped_storage().data_ptr()
    assert torch.equal(back.dequantize(), w.dequantize())


def test_opcheck():
    for t in (torch.randn(7, 3), torch.randint(0, 255, (5 * MIB,), dtype=torch.uint8)):
        torch.library.opcheck(torch.ops.peftx.huge_page_clone, (t,))
