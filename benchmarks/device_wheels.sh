#!/usr/bin/env bash
# Fill .device-wheels/ (git-ignored, carried to the lent GPU machine by benchmarks/gpu_device.sh) with
# what that machine lacks. It has Python 3.12, torch (CUDA), numpy, onnx, onnxruntime (CPU), pyarrow,
# rich, matplotlib, pybind11, setuptools and numba (the search's compiled step loop), but not pydantic (contracts.schema) or hnswlib (index
# build). hnswlib 0.8.0 is published as a source archive only, and this machine has no Python 3.12 to
# build a cp312 wheel with, so the archive travels and gpu_device.sh builds it there (pybind11 + g++).
# Usage: benchmarks/device_wheels.sh   (from the repository root; ~3 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
W=.device-wheels
mkdir -p "$W"
PIP=(.venv/bin/python -m pip download --no-deps --disable-pip-version-check -d "$W")
BIN=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# pydantic pins pydantic-core exactly: keep the pair in step with the versions in .venv
"${PIP[@]}" "${BIN[@]}" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
"${PIP[@]}" --no-binary=:all: --no-build-isolation hnswlib==0.8.0 || "${PIP[@]}" hnswlib==0.8.0
ls -la "$W"
du -sh "$W"
