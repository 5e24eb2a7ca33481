# UniMatch images, one multi-stage file (docs/deploy.md). Always name a target:
#   docker build --target serve -t unimatch:serve .    slim CPU serving image: `.[serve]`, no torch, no compiler
#   docker build --target train -t unimatch:train .    offline jobs (data synth, train, export, index build,
#                                                      features load): `.[train,serve]`, CPU torch
#   docker build --target gpu   -t unimatch:gpu .      GPU serving: CUDA runtime base + `.[gpu]` (onnxruntime-gpu)
# Stage order is the build order the legacy builder (no BuildKit) follows: it builds every stage up to
# the target, so each target's stages come before it and nothing it does not need does: `serve` builds
# 2 stages, `train` 4 (serve's 2 are cheap and cached), `gpu` all. BuildKit builds only the target's
# dependencies. No `# syntax=` line: it makes BuildKit fetch a frontend image from Docker Hub, which
# fails offline. Without --target the last stage (gpu) is built.
# Versions come from pyproject.toml's extras: the project is installed with its extras, nothing is
# pinned twice here.
#
# Offline or behind a TLS-intercepting proxy: put extra wheels (e.g. the CPU torch wheel) and a CA bundle
# `ca.pem` into deploy/docker/extra/ (git-ignored; its README.md says how) and pass
# --build-arg TORCH_INDEX_URL= ; scripts/compose-check does this and makes a local base image when no
# registry is reachable (--build-arg PYTHON_IMAGE=...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# build-serve: installs the serving project into /opt/venv, which the runtime stages copy. Every serve
# dependency has a binary wheel, so no compiler here. .dockerignore keeps data, bundles and .venv out.
FROM ${PYTHON_IMAGE} AS build-serve
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/extra
WORKDIR /src
# Optional wheels and CA bundle (deploy/docker/extra/): pip uses ca.pem when it is there.
COPY deploy/docker/extra/ /extra/
RUN python -m venv /opt/venv
# Dependencies first, from pyproject.toml itself (no second list of pins): this layer is rebuilt only
# when pyproject.toml changes, not on every source edit.
COPY pyproject.toml README.md ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\\n'.join(p['dependencies'] + [d for e in sys.argv[1:] for d in p['optional-dependencies'][e]]))" serve > /tmp/requirements.txt \
 && if [ -f /extra/ca.pem ]; then export PIP_CERT=/extra/ca.pem; fi \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
# The serving side only: the command-line dispatcher, the contracts and the service (model/ and
# index_builder/ are offline steps; tests/service/test_no_torch.py keeps the service free of them).
COPY unimatch ./unimatch
COPY contracts ./contracts
COPY service ./service
RUN if [ -f /extra/ca.pem ]; then export PIP_CERT=/extra/ca.pem; fi \
 && /opt/venv/bin/pip install --no-cache-dir ".[serve]" \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

# ---------------------------------------------------------------------------------------------
# serve: slim CPU serving image, no torch, no compiler, no curl.
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

# ---------------------------------------------------------------------------------------------
# build-train: the serve venv plus the train extra. hnswlib 0.8.0 is source-only on PyPI, so this
# builder (and only this one: the runtime stage copies /opt/venv alone) gets a C++ compiler.
# HNSWLIB_NO_NATIVE: hnswlib otherwise compiles with -march=native, and the image would die with
# SIGILL on a node whose CPU lacks an instruction the build machine had.
FROM build-serve AS build-train
ENV DEBIAN_FRONTEND=noninteractive HNSWLIB_NO_NATIVE=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
# torch==2.13.0 is pinned in the `train` extra; the CPU index gives the +cpu wheel instead of the
# default CUDA build (several GB of nvidia-* wheels an offline CPU job never uses). Empty = no extra
# index (the wheel comes from deploy/docker/extra/ instead).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The offline steps join the serving side copied by build-serve.
COPY model ./model
COPY index_builder ./index_builder
COPY loadtests ./loadtests
COPY experiments ./experiments
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\\n'.join(p['dependencies'] + [d for e in sys.argv[1:] for d in p['optional-dependencies'][e]]))" train serve > /tmp/requirements-train.txt \
 && if [ -f /extra/ca.pem ]; then export PIP_CERT=/extra/ca.pem; fi \
 && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements-train.txt \
 && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[train,serve]"

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
COPY contracts ./contracts
COPY service ./service
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
