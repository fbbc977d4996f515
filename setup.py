"""Builds peftx._C with CMake + ninja against the torch already installed (no build isolation).

Environment:
  PEFTX_CUDA=auto|1|0    CUDA kernels: build when possible (default) / required / skipped
  PEFTX_CUDA_ARCHS       CMake CUDA architectures, default "80-real;90a-real;80-virtual"
  CUDA_HOME / CUDACXX    the CUDA toolkit (the real one, not a wrapper script on PATH)
  PEFTX_BUILD_DIR        CMake build directory (default build/<python tag>)
  MAX_JOBS               parallel compile jobs
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _torch_facts() -> tuple[str, bool, int]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - build-time guidance
        raise RuntimeError(
            "peftx builds against the installed torch: install torch first, then build with "
            "`pip install --no-build-isolation .`"
        ) from e
    return os.path.dirname(torch.__file__), torch.version.cuda is not None, int(torch._C._GLIBCXX_USE_CXX11_ABI)


def _cuda_home() -> Path | None:
    """The real CUDA toolkit: CUDA_HOME/CUDA_PATH, CUDACXX's folder, then /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if os.environ.get("CUDACXX"):
        candidates.append(str(Path(os.environ["CUDACXX"]).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    return None


def _tool(module: str, name: str) -> str:
    """The cmake / ninja from the pip packages named in build-system.requires (the system cmake may
    be older than 3.26), else the one on PATH."""
    try:
        mod = __import__(module)
        return str(Path(mod.BIN_DIR if module == "ninja" else mod.CMAKE_BIN_DIR) / name)
    except (ImportError, AttributeError):
        return name


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        torch_dir, torch_cuda, cxx_abi = _torch_facts()
        mode = os.environ.get("PEFTX_CUDA", "auto").strip().lower()
        cuda = {"auto": "AUTO", "1": "ON", "on": "ON", "true": "ON", "0": "OFF", "off": "OFF", "false": "OFF"}.get(mode)
        if cuda is None:
            raise RuntimeError(f"PEFTX_CUDA must be auto, 1 or 0, got {mode!r}")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("PEFTX_BUILD_DIR", ROOT / "build" / f"py{sys.version_info.major}{sys.version_info.minor}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            _tool("cmake", "cmake"), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'ninja')}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DPython3_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPEFTX_TORCH_DIR={torch_dir}",
            f"-DPEFTX_TORCH_CUDA={'ON' if torch_cuda else 'OFF'}",
            f"-DPEFTX_CXX_ABI={cxx_abi}",
            f"-DPEFTX_CUDA={cuda}",
        ]
        if os.environ.get("PEFTX_CUDA_ARCHS"):
            args.append(f"-DPEFTX_CUDA_ARCHS={os.environ['PEFTX_CUDA_ARCHS']}")
        env = dict(os.environ)
        home = _cuda_home()
        if cuda != "OFF" and torch_cuda and home is not None:
            env["CUDA_HOME"] = str(home)
            env["CUDACXX"] = str(home / "bin" / "nvcc")
            args.append(f"-DCMAKE_CUDA_COMPILER={home / 'bin' / 'nvcc'}")
            args.append(f"-DCUDAToolkit_ROOT={home}")
        subprocess.run(args, check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run([_tool("cmake", "cmake"), "--build", str(build_dir), "-j", jobs], check=True, env=env)


setup(ext_modules=[Extension("peftx._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
