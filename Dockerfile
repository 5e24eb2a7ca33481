# syntax=docker/dockerfile:1
# UniMatch images, one multi-stage file (docs/deploy.md):
#   serve  (default) slim CPU serving image: python:3.11-slim + `pip install .[serve]`, no torch
#   gpu              GPU serving image: CUDA runtime base + `pip install .[gpu]` (onnxruntime-gpu)
#   train            offline jobs (data synth, train, export, index build, features load): `.[train,serve]`
# Versions come from pyproject.toml's extras: the project is installed with its extras, nothing is
# pinned twice here. Build:  docker build --target serve -t unimatch:serve .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Builders: each installs the project into its own virtual environment under /opt/venv, which the
# runtime stages copy. Source is copied once; .dockerignore keeps data, bundles and .venv out.
FROM ${PYTHON_IMAGE} AS build-serve
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, from pyproject.toml itself (no second list of pins): this layer is rebuilt only
# when pyproject.toml changes, not on every source edit.
COPY pyproject.toml README.md ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\\n'.join(p['dependencies'] + [d for e in sys.argv[1:] for d in p['optional-dependencies'][e]]))" serve > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY unimatch ./unimatch
COPY model ./model
COPY index_builder ./index_builder
COPY service ./service
COPY loadtests ./loadtests
COPY experiments ./experiments
RUN /opt/venv/bin/pip install --no-cache-dir ".[serve]" \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM build-serve AS build-train
# torch==2.13.0 is pinned in the `train` extra; the CPU index gives the +cpu wheel instead of the
# default CUDA build (several GB of nvidia-* wheels an offline CPU job never uses).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\\n'.join(p['dependencies'] + [d for e in sys.argv[1:] for d in p['optional-dependencies'][e]]))" train serve > /tmp/requirements-train.txt \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements-train.txt \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" ".[train,serve]"

# ---------------------------------------------------------------------------------------------
# train: the offline image (init job of docker-compose.yml, k8s Jobs and the PyTorchJob).
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH
# /data and /bundles exist and belong to the job user so that named volumes mounted there (compose's
# init job) start out writable by it: Docker seeds a new volume with the mount point's ownership.
RUN groupadd --system --gid 10001 unimatch \
 && useradd --system --uid 10001 --gid unimatch --home-dir /work --create-home unimatch \
 && mkdir -p /data /bundles \
 && chown 10001:10001 /data /bundles
COPY --from=build-train /opt/venv /opt/venv
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["unimatch"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# gpu: serving with onnxruntime-gpu on the CUDA 12 / cuDNN 9 runtime that onnxruntime-gpu>=1.20 wants.
# Ubuntu 24.04's python3 is 3.12, inside pyproject's requires-python (>=3.11,<3.13).
FROM ${CUDA_IMAGE} AS build-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
# Dependencies first, from pyproject.toml itself (no second list of pins): this layer is rebuilt only
# when pyproject.toml changes, not on every source edit.
COPY pyproject.toml README.md ./
RUN python3 -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\\n'.join(p['dependencies'] + [d for e in sys.argv[1:] for d in p['optional-dependencies'][e]]))" gpu > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY unimatch ./unimatch
COPY model ./model
COPY index_builder ./index_builder
COPY service ./service
COPY loadtests ./loadtests
COPY experiments ./experiments
RUN /opt/venv/bin/pip install --no-cache-dir ".[gpu]"

FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive PATH=/opt/venv/bin:$PATH \
    UNIMATCH_BUNDLE=/bundles/current UNIMATCH_PROVIDERS=cuda
# python3 (same minor as the builder) and curl for the HEALTHCHECK; distro package versions follow
# the pinned CUDA base tag. hadolint ignore: apt pins would break on every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 unimatch \
 && useradd --system --uid 10001 --gid unimatch --no-create-home unimatch
COPY --from=build-gpu /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8000/healthz"]
# `unimatch serve` reads the bundle path and every other setting from UNIMATCH_* (service/config.py).
ENTRYPOINT ["unimatch", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# serve (last stage = default target): slim CPU serving image, no torch, no compiler, no curl.
FROM ${PYTHON_IMAGE} AS serve
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    UNIMATCH_BUNDLE=/bundles/current
RUN groupadd --system --gid 10001 unimatch \
 && useradd --system --uid 10001 --gid unimatch --no-create-home unimatch
COPY --from=build-serve /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
# The slim image has no curl: the probe is one stdlib call against the liveness route.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as r; sys.exit(r.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# `unimatch serve` reads the bundle path and every other setting from UNIMATCH_* (service/config.py).
ENTRYPOINT ["unimatch", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
