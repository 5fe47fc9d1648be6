# loraplex: the server with the embedded SmolLM2-135M-Instruct baked in (serves with no network).
#
#   docker build -t loraplex .
#   docker run --rm -p 8000:8000 -v loraplex-data:/data \
#       -v "$PWD/keys.json:/etc/loraplex/keys.json:ro" loraplex --keys-file /etc/loraplex/keys.json
#
# Arguments after the image name are `loraplex serve` flags (the entrypoint binds 0.0.0.0, so pass
# --keys-file: without one the server is unauthenticated). Give `docker stop` more time than
# --drain-timeout (default 30 s): `docker stop -t 45`.
#
# CUDA: build on a CUDA runtime base, with torch from the matching PyTorch index, e.g.
#   docker build -t loraplex:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       --build-arg EXTRAS=triton \
#       --build-arg RUNTIME_APT_PACKAGES="gcc libc6-dev python3-dev" .
#   docker run --gpus all ...
# (Python comes from the base's apt when the base has none; Triton compiles small launchers with
# the system C compiler at first use, hence the runtime packages; on CPU the default gcc builds
# the LoRA kernel of server/ops/lora_native.c at first start.) See docs/operations.md.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with loraplex, torch and the converted embedded model ----
FROM ${BASE_IMAGE} AS build
ARG TORCH_PIN=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/loraplex/venv
ENV PATH=/opt/loraplex/venv/bin:$PATH \
    LORAPLEX_CACHE_DIR=/opt/loraplex/cache
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY deploy/docker/install.sh ./deploy/docker/install.sh
RUN PYTHON=/opt/loraplex/venv/bin/python TORCH_PIN="${TORCH_PIN}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
        EXTRAS="${EXTRAS}" sh deploy/docker/install.sh

# ---- runtime: the same base, the venv and the converted model, a non-root user ----
FROM ${BASE_IMAGE} AS runtime
ARG RUNTIME_APT_PACKAGES="gcc libc6-dev"
ENV DEBIAN_FRONTEND=noninteractive
# ${packages} is a list: split on purpose (SC2086).
# hadolint ignore=DL3008,SC2086
RUN packages="${RUNTIME_APT_PACKAGES}"; \
    if ! command -v python3 >/dev/null; then packages="python3 ca-certificates ${packages}"; fi; \
    if [ -n "${packages}" ]; then \
        apt-get update && apt-get install -y --no-install-recommends ${packages} \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/loraplex \
        --shell /usr/sbin/nologin loraplex \
    && mkdir -p /data \
    && chown loraplex:loraplex /data
COPY --from=build /opt/loraplex /opt/loraplex
ENV PATH=/opt/loraplex/venv/bin:$PATH \
    LORAPLEX_CACHE_DIR=/opt/loraplex/cache \
    LORAPLEX_DATA_DIR=/data \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/loraplex
EXPOSE 8000
# Liveness only (/ready is for load balancers): the engine loop runs. The port follows LORAPLEX_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAPLEX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["loraplex", "serve", "--host", "0.0.0.0"]
