#!/usr/bin/env bash
# Load test of the service on the 1M bundle of benchmarks/pipeline_1m.sh (issue 7): features into
# Redis, the service pinned to CPU 0, Locust pinned to CPU 1 (Redis unpinned), stepped open-loop load,
# plus the engine alone in-process on the same bundle. Report + plot into docs/loadtest/.
# Usage: benchmarks/loadtest_1m.sh [WORKDIR] (default /tmp/p1m); STEPS=2,4,... overrides the steps.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/p1m}
U=.venv/bin/unimatch
REDIS=${REDIS_URL:-redis://127.0.0.1:6379/2}
PORT=${PORT:-8011}
$U features load --data "$W/data" --redis-url "$REDIS"
.venv/bin/python -m loadtests.users --data "$W/data" --out "$W/users.txt"
taskset -c 0 $U serve --bundle "$W/bundle-adv" --redis-url "$REDIS" --port "$PORT" > "$W/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null
.venv/bin/python -m loadtests.run --host "http://127.0.0.1:$PORT" --users-file "$W/users.txt" \
  --steps "${STEPS:-2,4,6,8,10,12,14}" --step-seconds "${STEP_SECONDS:-25}" --warmup 5 \
  --bundle "$W/bundle-adv" --data "$W/data" --engine-threads 1 --locust-cpus 1 \
  --machine "2-core dev VM: service pinned to CPU 0 (1 worker, 1 onnxruntime thread), Locust pinned to CPU 1, Redis unpinned; the engine-alone run used 1 thread" \
  --out docs/loadtest
