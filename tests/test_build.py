"""How the native library was built: every device op has its kernels, every CUDA kernel is linked."""

import os
import shutil
import subprocess

import pytest
import torch

import peftx
from peftx import _native

NF4_OPS = ["nf4_quantize", "nf4_dequantize", "nf4_double_quantize", "nf4_double_dequantize", "nf4_matmul",
           "nf4_matmul_t"]
LORA_OPS = ["lora_linear_fwd", "lora_linear_bwd", "lora_multi_fwd"]
DORA_OPS = ["nf4_lora_row_norm", "dense_lora_row_norm"]
DEVICE_OPS = NF4_OPS + LORA_OPS + DORA_OPS
CUDA_KERNELS = ["peftx::nf4::" + k for k in ("nf4_quantize_kernel", "nf4_dequantize_kernel",
                                             "nf4_dequantize8_kernel", "nf4_double_quantize_kernel",
                                             "nf4_double_dequantize_kernel", "nf4_gemv_kernel")] + \
               ["peftx::lora::(anonymous namespace)::" + k for k in ("lora_dropout_kernel", "lora_dropout_axpy_kernel",
                                                                     "lora_multi_shrink_kernel",
                                                                     "lora_multi_expand_kernel")] + \
               ["peftx::dora::nf4_lora_row_norm_kernel"] + \
               [f"peftx::dora::dense_lora_row_norm_kernel<{t}>" for t in ("float", "peftx::f16_t", "peftx::bf16_t")]
TORCH_IS_CUDA_BUILD = torch.version.cuda is not None
REQUIRE_CUDA = os.environ.get("PEFTX_REQUIRE_CUDA_BUILD") == "1"


@pytest.mark.parametrize("op", DEVICE_OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"peftx::{op}", "CPU")


def test_cuda_built_when_required():
    if REQUIRE_CUDA:
        assert _native.cuda_built(), "PEFTX_REQUIRE_CUDA_BUILD=1 but the CUDA kernels were not built"
    if not TORCH_IS_CUDA_BUILD:
        assert not _native.cuda_built()


@pytest.mark.skipif(not _native.cuda_built(), reason="this build has no CUDA kernels (CPU-only torch or no toolkit)")
@pytest.mark.parametrize("op", DEVICE_OPS)
def test_cuda_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"peftx::{op}", "CUDA")


@pytest.mark.skipif(not _native.cuda_built(), reason="this build has no CUDA kernels (CPU-only torch or no toolkit)")
def test_cuda_kernel_symbols_and_archs_in_library():
    lib = _native._C.__file__
    nm = subprocess.run(["nm", "-C", lib], capture_output=True, text=True, check=True).stdout
    for k in CUDA_KERNELS:
        assert k in nm, f"{k} missing from {lib}"
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if os.path.exists(cuobjdump):
        elf = subprocess.run([cuobjdump, "--list-elf", lib], capture_output=True, text=True).stdout
        ptx = subprocess.run([cuobjdump, "--list-ptx", lib], capture_output=True, text=True).stdout
        assert "sm_80" in elf and "sm_90a" in elf and "sm_80" in ptx, (elf, ptx)


def test_public_api():
    for name in ("Linear4bit", "NF4Weight", "nf4_quantize", "nf4_matmul", "nf4_matmul_t"):
        assert hasattr(peftx, name)
