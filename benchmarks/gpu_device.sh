#!/usr/bin/env bash
# The GPU check in one call of the device tool (docs/gpu.md). On the lent machine, from the repository
# root, with the git-ignored .device-wheels/ carried (benchmarks/device_wheels.sh fills it):
#
#   run(command="bash benchmarks/gpu_device.sh", carry=[".device-wheels"], timeout_s=600)
#
# Installs the carried wheels (pydantic; hnswlib is built from its source archive by the driver, in
# the background), then runs benchmarks/gpu_device.py, which makes the 1M bundle on the device and
# measures; results and the log land in $OUT. Extra arguments go to the driver. Dry run here:
#   OUT=/tmp/gd-out PYTHON=.venv/bin/python bash benchmarks/gpu_device.sh --tiny --device cpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_device_out}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$SITE"
if ls .device-wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .device-wheels/*.whl || { echo "gpu_device.sh: installing .device-wheels failed" | tee "$OUT/gpu_device.log"; exit 3; }
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SITE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/nvidia-smi.txt"
"$PY" benchmarks/gpu_device.py --out "$OUT" --site "$SITE" "$@" 2>&1 | tee "$OUT/gpu_device.log"
exit "${PIPESTATUS[0]}"
