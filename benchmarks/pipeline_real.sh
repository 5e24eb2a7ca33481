#!/usr/bin/env bash
# A real catalogue end to end as a user would run it, for the cross-dataset search table
# (docs/search-benchmark.md, "Calibrated search on real catalogues"): import -> train Backbone&RRL at
# the default budget of `unimatch train` (one epoch) -> export -> index build --data (4-layer HNSW,
# then the search calibration on validation users) -> bench search on test users, as served.
# Usage: benchmarks/pipeline_real.sh SOURCE [WORKDIR]   (SOURCE: amazon-phone-electronic,
# amazon-sport-cloth, movielens-100k, or synth-PRESET); results into $W/bench/SOURCE.{json,md,png}.
# SPACE=scores builds the graph over vectors + probe-user scores (`unimatch index score-space`).
set -euo pipefail
cd "$(dirname "$0")/.."
U=.venv/bin/unimatch
SRC=${1:?usage: benchmarks/pipeline_real.sh SOURCE [WORKDIR]}
W=${2:-/tmp/real}/$SRC
mkdir -p "$W" "$W/../bench"
t() { local s=$SECONDS; "$@"; echo "[pipeline_real] $(( SECONDS - s )) s: $*" | tee -a "$W/timings.txt"; }
if [ ! -f "$W/data/dataset.json" ]; then
  case "$SRC" in
    synth-*) t $U data synth --out "$W/data" --preset "${SRC#synth-}" --seed 0 ;;
    *) t $U data import "$SRC" --out "$W/data" ;;
  esac
fi
[ -f "$W/run/DONE" ] || { t $U train --data "$W/data" --method "${METHOD:-backbone-rrl}" --out "$W/run" --threads 2 --no-progress ${STEPS:+--max-steps "$STEPS"}; touch "$W/run/DONE"; }
[ -f "$W/bundle/manifest.json" ] || t $U export --run "$W/run" --out "$W/bundle"
grep -q '"calibration"' "$W/bundle/manifest.json" || t $U index build --bundle "$W/bundle" --threads 2 --data "$W/data" ${SPACE:+--space "$SPACE"}
t $U bench search --bundle "$W/bundle" --data "$W/data" --users "${USERS:-300}" --k "${KS:-50,200,1000}" \
  --sweep-users "${SWEEP_USERS:-60}" --sweep-k 200 \
  --json "$W/../bench/$SRC.json" --md "$W/../bench/$SRC.md" --plot "$W/../bench/$SRC.png"
