"""CSV parsing, summary and report of loadtests/run.py on a small hand-made Locust history."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from loadtests.run import parse_history, summarize, write_report
from loadtests.users import export_user_ids
from loadtests.workload import Workload, check_answer, parse_mix

HEADER = [
    "Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s",
    "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%",
    "Total Request Count", "Total Failure Count", "Total Median Response Time", "Total Average Response Time",
    "Total Min Response Time", "Total Max Response Time", "Total Average Content Size",
]  # fmt: skip


def _row(ts: int, users: int, n: int, fails: int, p50: float, p95: float, p99: float, p999: float) -> list:
    return [ts, users, "", "Aggregated", 0, 0, p50, p50, p50, p50, p95, p95, p99, p99, p999, p999, p999, n, fails, p50, p50, 1, p999, 900]


def _fixture(tmp_path: Path) -> tuple[Path, dict]:
    rows = [
        _row(1000, 5, 3, 0, 9, 9, 9, 9),  # warm-up of step 0: before its measure_start
        _row(1001, 5, 4, 0, 8, 9, 9, 9),  # same second as the reset at 1001.4: ignored
        _row(1002, 5, 5, 0, 8, 12, 15, 15),
        _row(1005, 5, 20, 0, 8, 12, 15, 16),  # step 0 last row: 15 requests in 3 s -> 5 req/s
        _row(1008, 20, 7, 0, 30, 30, 30, 30),  # step 1 warm-up (stats not reset yet): excluded
        _row(1010, 20, 10, 0, 10, 20, 40, 50),
        _row(1012, 20, 50, 2, 11, 25, 45, 60),  # step 1: 40 in 2 s -> 20 req/s, 2 failures
    ]
    history = tmp_path / "locust_stats_history.csv"
    with history.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        # a per-endpoint row (full history) must be ignored in favour of the Aggregated one
        w.writerow([1005, 5, "POST", "/match", 0, 0, *([99] * 11), 999, 0, 1, 1, 1, 1, 1])
        w.writerows(rows)
    schedule = {
        "user_rate": 1.0,
        "steps": [
            {"index": 0, "offered_rps": 5, "users": 5, "measure_start": 1001.4, "end": 1006.0},
            {"index": 1, "offered_rps": 20, "users": 20, "measure_start": 1009.2, "end": 1012.5},
        ],
        "flags": {
            "1": {"answers": 48, "partial": 3, "degraded": 0, "cold_start": 2, "unknown": 2, "sum_total_ms": 192.0, "sum_features_ms": 24.0}
        },
    }
    return history, schedule


def test_parse_history_per_step(tmp_path: Path) -> None:
    history, schedule = _fixture(tmp_path)
    s0, s1 = parse_history(history, schedule)
    assert (s0.requests, s0.failures, s0.throughput_rps, s0.p50_ms, s0.p99_ms, s0.p999_ms) == (20, 0, 5.0, 8, 15, 16)
    assert (s1.requests, s1.failures, s1.throughput_rps, s1.p95_ms, s1.p99_ms) == (50, 2, 20.0, 25, 45)
    assert (s1.partial, s1.cold_start, s0.partial) == (3, 2, 0)
    assert s1.server_ms == {"total_ms": 4.0, "features_ms": 0.5} and s0.server_ms is None
    assert s1.client_mean_ms == 11


def test_summary_and_report(tmp_path: Path) -> None:
    history, schedule = _fixture(tmp_path)
    steps = parse_history(history, schedule)
    engine = {"p50_ms": 5.0, "p99_ms": 7.0, "throughput_rps_1thread": 150.0, "throughput_rps_parallel": 25.0, "threads": 2, "matches": 900}
    summary = summarize(steps, engine)
    assert summary["saturation_throughput_rps"] == 20.0
    assert summary["failures_below_saturation"] == 0
    assert summary["throughput_vs_engine"] == pytest.approx(0.8)
    assert summary["step_near_70pct_saturation"]["offered_rps"] == 20  # 0.7 * 20 = 14 is nearer 20 than 5
    assert summary["p99_at_70pct_over_engine_p50"] == pytest.approx(9.0)
    report = write_report(tmp_path / "out", steps, summary, engine, {"command": "python -m loadtests.run --x", "host": "h"})
    text = report.read_text()
    assert "| 20 | 20 | 20.0 | 11 | 25 | 45 | 60 | 50 | 2 | 3 | 0 | 2 |" in text
    assert "service / engine-alone throughput: 0.80 (target >= 0.80: met)" in text
    assert "= 9.00 x engine p50 (target <= 3: MISSED)" in text
    assert "| 20 | 0.50 | nan | nan | nan | 4.00 | 11.0 | 64% |" in text  # 4 ms of 11 in the server
    png = (tmp_path / "out" / "loadtest.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["saturation_throughput_rps"] == 20.0


def _why(answer: dict[str, Any], k: int, eligible: int = 100, domain: str = "d0") -> str:
    problem = check_answer(200, answer, domain=domain, k=k, eligible=eligible)
    assert problem is not None, "expected a wrong answer"
    return problem


def test_check_answer_rules() -> None:
    good: dict[str, Any] = {"domain": "d0", "partial": False, "items": [{"entity_id": f"e{i}", "score": 10 - i} for i in range(3)]}
    assert check_answer(200, good, domain="d0", k=3, eligible=100) is None
    assert check_answer(503, None, domain="d0", k=3, eligible=100) == "HTTP 503"
    assert "items for k=2" in _why(good, k=2)
    assert "not flagged partial" in _why(good, k=5)
    assert check_answer(200, good, domain="d0", k=5, eligible=3) is None  # fewer eligible than k
    assert check_answer(200, {**good, "partial": True}, domain="d0", k=5, eligible=100) is None
    dup = {**good, "items": good["items"] + [good["items"][0] | {"score": 0}]}
    assert _why(dup, k=4) == "duplicate entity ids"
    unsorted = {**good, "items": list(reversed(good["items"]))}
    assert _why(unsorted, k=3) == "items not best first"
    assert "answered domain" in _why(good, k=3, domain="d1")


def test_workload_mix_and_skew() -> None:
    assert parse_mix("a:3,b:1") == [("a", 3.0), ("b", 1.0)]
    assert parse_mix("10,50", int) == [(10, 1.0), (50, 1.0)]
    with pytest.raises(ValueError):
        parse_mix("a:-1")
    users = [f"u{i}" for i in range(1000)]
    wl = Workload(users, parse_mix("d0:3,d1:1"), parse_mix("10:1,100:1", int), zipf_s=1.1, unknown=0.05, seed=1)
    rng = random.Random(0)
    draws = [wl.draw(rng) for _ in range(20000)]
    unknown = sum(not known for *_, known in draws) / len(draws)
    assert 0.04 < unknown < 0.06
    assert 0.72 < sum(d == "d0" for _, d, _, _ in draws) / len(draws) < 0.78
    counts: dict[str, int] = {}
    for u, _, _, known in draws:
        if known:
            counts[u] = counts.get(u, 0) + 1
    top = sorted(counts.values(), reverse=True)
    # Zipf(1.1) over 1000 users: the most popular user gets ~1/H share (H = sum r^-1.1 ~ 4.9), ~20%
    assert top[0] / sum(top) > 0.12 and math.isclose(top[0] / top[1], 2**1.1, rel_tol=0.25)


def test_export_user_ids(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    (tmp_path / "ds" / "users").mkdir(parents=True)
    np.save(tmp_path / "ds" / "users" / "external_id.npy", np.array(["u1", "u2", "u3"]))
    assert export_user_ids(tmp_path / "ds", tmp_path / "out" / "users.txt") == 3
    assert (tmp_path / "out" / "users.txt").read_text() == "u1\nu2\nu3\n"
    with pytest.raises(FileNotFoundError):
        export_user_ids(tmp_path / "nope", tmp_path / "x.txt")
