"""The fused AdamW CUDA kernels' per-thread functions, run over their whole grid on the CPU
(peftx_emulate ops, csrc/optim/adamw_emulate.cpp), against the CPU kernels and the references; and,
with a GPU, the CUDA kernels themselves against the CPU kernels, bit for bit."""

import pytest
import torch

from peftx import _native
from peftx.ops import optim as optim_ops
from peftx.ops.optim_reference import adamw8bit_step_ref, adamw_step_ref

from .conftest import HYPER, clone_all, make_8bit_case, make_fp32_case

emu = torch.ops.peftx_emulate
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Sizes around the launch geometry: 4096-element chunks (fp32 kernel), 256-element blocks (8-bit).
SIZES = [[1, 255, 256, 257], [4095, 4096, 4097], [8193, 3, 70001]]


def _equal(a, b):
    return all(torch.equal(x.float().nan_to_num(7.0), y.float().nan_to_num(7.0)) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
def test_adamw_grid_matches_cpu_kernel_and_reference(dtype, sizes):
    case = make_fp32_case(sizes, dtype)
    grid, cpu, ref = clone_all(case), clone_all(case), clone_all(case)
    emu.adamw_step_kernel(*grid, *HYPER.values())
    optim_ops.adamw_step(*cpu, **HYPER)
    adamw_step_ref(*ref, **HYPER)
    for g, c, r in zip(grid[:4], cpu[:4], ref[:4]):
        assert _equal(g, c) and _equal(g, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw8bit_grid_matches_cpu_kernel_and_reference(dtype, sizes, maximize):
    case = make_8bit_case(sizes, dtype)
    grid, cpu, ref = clone_all(case), clone_all(case), clone_all(case)
    hyper = {**HYPER, "maximize": maximize}
    emu.adamw8bit_step_kernel(*grid, *hyper.values())
    optim_ops.adamw8bit_step(*cpu, **hyper)
    adamw8bit_step_ref(*ref, **hyper)
    for g, c, r in zip(grid[:6], cpu[:6], ref[:6]):
        assert _equal(g, c) and _equal(g, r)


def test_adamw8bit_grid_non_finite_block():
    case = make_8bit_case([600], torch.float32)
    case[1][0][10] = float("nan")
    grid, cpu = clone_all(case), clone_all(case)
    emu.adamw8bit_step_kernel(*grid, *HYPER.values())
    optim_ops.adamw8bit_step(*cpu, **HYPER)
    for g, c in zip(grid[:6], cpu[:6]):
        assert _equal(g, c)


cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and _native.cuda_built()),
                               reason="needs a CUDA GPU and a build with CUDA kernels")


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
def test_cuda_adamw_matches_cpu_kernel(dtype, sizes):
    case = make_fp32_case(sizes, dtype)
    cpu = clone_all(case)
    gpu = [[t.cuda() for t in lst] if k < 4 else lst for k, lst in enumerate(clone_all(case))]
    optim_ops.adamw_step(*cpu, **HYPER)
    optim_ops.adamw_step(*gpu, **HYPER)
    for g, c in zip(gpu[:4], cpu[:4]):
        assert _equal([t.cpu() for t in g], c)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
def test_cuda_adamw8bit_matches_cpu_kernel(dtype, sizes):
    case = make_8bit_case(sizes, dtype)
    cpu = clone_all(case)
    gpu = [[t.cuda() for t in lst] if k < 6 else lst for k, lst in enumerate(clone_all(case))]
    optim_ops.adamw8bit_step(*cpu, **HYPER)
    optim_ops.adamw8bit_step(*gpu, **HYPER)
    for g, c in zip(gpu[:6], cpu[:6]):
        assert _equal([t.cpu() for t in g], c)


@cuda_only
def test_cuda_opcheck():
    case = [[t.cuda() for t in lst] if k < 4 else lst for k, lst in enumerate(make_fp32_case([7, 5000], torch.float32))]
    torch.library.opcheck(torch.ops.peftx.adamw_step.default, (*case, *HYPER.values()))
    case8 = [[t.cuda() for t in lst] if k < 6 else lst
             for k, lst in enumerate(make_8bit_case([7, 600], torch.bfloat16))]
    torch.library.opcheck(torch.ops.peftx.adamw8bit_step.default, (*case8, *HYPER.values()))


@pytest.mark.parametrize("op", ["adamw_step", "adamw8bit_step"])
def test_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"peftx::{op}", "CPU")
    if _native.cuda_built():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"peftx::{op}", "CUDA")


@pytest.mark.skipif(not _native.cuda_built(), reason="this build has no CUDA kernels")
def test_cuda_kernel_symbols_in_library():
    import subprocess
    nm = subprocess.run(["nm", "-C", _native._C.__file__], capture_output=True, text=True, check=True).stdout
    for k in ("peftx::optim::adamw_kernel", "peftx::optim::adamw8_kernel", "peftx::optim::launch_adamw8"):
        assert k in nm, f"{k} missing from the library"
