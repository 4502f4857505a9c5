#!/usr/bin/env bash
# Build the llama.cpp anchor's own venv (.venv-llamacpp, git-ignored) for tests/bench/anchors.py.
# Not part of .ci/install: pip builds llama-cpp-python from its source package (llama.cpp via
# CMake), which takes several minutes on 2 cores. The bench skips the llama.cpp anchor, saying
# why, when this venv is absent.
#
#   bash tests/bench/setup_llamacpp.sh            # -> .venv-llamacpp/bin/python -m llama_cpp.server
#   JOBS=2 bash tests/bench/setup_llamacpp.sh     # build with both cores (default: 1, niced)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel
# Built for this CPU (GGML_NATIVE: -march=native), the way llama.cpp is meant to be run; no BLAS,
# no GPU backend. --no-binary forces the source build even where a wheel exists.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-1}
nice -n 10 "$VENV/bin/pip" install --no-binary llama-cpp-python --no-cache-dir \
    "llama-cpp-python[server]==$VERSION"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama_cpp', llama_cpp.__version__)"
