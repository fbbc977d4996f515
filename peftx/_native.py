"""Loads the compiled extension. Importing it registers the peftx torch ops; failure is an error."""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

try:
    from peftx import _C
except ImportError as e:
    raise ImportError(
        "peftx's compiled extension peftx._C could not be imported. Build it against the installed "
        "torch with `pip install --no-build-isolation -e .` (see README). Original error: " + str(e)
    ) from e

__all__ = ["_C", "cuda_built", "cpu_features"]


def cuda_built() -> bool:
    """Whether this build compiled and linked the CUDA kernels."""
    return bool(_C.cuda_built())


def cpu_features() -> dict[str, bool]:
    """Instruction-set extensions of this CPU, as the native code sees them."""
    return dict(_C.cpu_features())
