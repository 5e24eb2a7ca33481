"""/metrics under several worker processes: prometheus_client multiprocess mode aggregates them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_metrics_from_several_workers_are_summed(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = (
        "from service import metrics\n"
        "metrics.RESULTS.labels(entity_type='item').inc(3)\n"
        "metrics.REQUEST_DURATION.labels(domain='domain_0').observe(0.003)\n"
        "metrics.set_bundle('v1', 'fake')\n"
    )
    for _ in range(2):  # two "workers", one after the other, each its own process
        _run(worker, env)
    text = _run("from service import metrics\nprint(metrics.render()[0].decode())", env)
    assert 'unimatch_results_total{entity_type="item"} 6.0' in text
    assert 'unimatch_request_duration_seconds_count{domain="domain_0"} 2.0' in text
