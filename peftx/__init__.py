"""peftx: parameter-efficient fine-tuning for PyTorch on fused C++/CUDA kernels."""

from peftx import _native  # noqa: F401  (loads peftx._C: registers the torch ops)
from peftx import optim
from peftx.quant.linear4bit import Linear4bit
from peftx.quant.matmul import nf4_matmul, nf4_matmul_t, nf4_quantize
from peftx.quant.nf4_weight import NF4Weight

__version__ = "0.1.0"

__all__ = ["Linear4bit", "NF4Weight", "nf4_matmul", "nf4_matmul_t", "nf4_quantize", "optim"]
