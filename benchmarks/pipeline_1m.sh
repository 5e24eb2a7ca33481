#!/usr/bin/env bash
# The 1M-entity path end to end: data -> train (Backbone&RRL with the FGSM option, and a two-tower
# baseline) -> export -> 4-layer HNSW -> search benchmark. Artefacts under $W (default /tmp/p1m);
# reports into docs/. Usage: benchmarks/pipeline_1m.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
U=.venv/bin/unimatch
W=${1:-/tmp/p1m}
STEPS=${STEPS:-2000}  # 1,773 s for backbone-rrl-adv on 2 cores (docs/search-benchmark.md)
mkdir -p "$W"
t() { local s=$SECONDS; "$@"; echo "[pipeline_1m] $(( SECONDS - s )) s: $*" | tee -a "$W/timings.txt"; }
[ -f "$W/data/dataset.json" ] || t $U data synth --out "$W/data" --preset 1m --seed 0
[ -f "$W/run-adv/DONE" ] || { t $U train --data "$W/data" --method backbone-rrl-adv --out "$W/run-adv" --max-steps "$STEPS" --threads 2 --no-progress; touch "$W/run-adv/DONE"; }
[ -f "$W/bundle-adv/graph_health.json" ] || { t $U export --run "$W/run-adv" --out "$W/bundle-adv"; t $U index build --bundle "$W/bundle-adv" --threads 2; }
[ -f "$W/run-tt/DONE" ] || { t $U train --data "$W/data" --method two-tower --out "$W/run-tt" --max-steps "$STEPS" --threads 2 --no-progress; touch "$W/run-tt/DONE"; }
[ -f "$W/bundle-tt/manifest.json" ] || t $U export --run "$W/run-tt" --out "$W/bundle-tt"
t $U bench search --bundle "$W/bundle-adv" --data "$W/data" --users "${USERS:-120}" --k 50,200,1000 \
  --sweep-users "${SWEEP_USERS:-40}" --two-tower "$W/bundle-tt" \
  --json docs/search-benchmark-1m.json --md docs/search-benchmark-1m.md --plot docs/search-benchmark-1m.png
