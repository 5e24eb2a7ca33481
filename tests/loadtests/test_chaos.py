"""The chaos suite's short version (loadtests/chaos.py): its own Redis and service on loopback, ~30 s.

Asserts what must hold on any machine (no failed request outside the overload phase, an empty Redis
flagged on every answer, a corrupted bundle refused and never served, slow sockets closed); the
latency and completeness numbers are for docs/reliability.md, not asserted here.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path

import pytest

from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH"),
]


def test_short_chaos_run(tmp_path: Path) -> None:
    from loadtests.chaos import render, run_chaos

    bundle = make_fake_bundle(tmp_path / "bundle", num_entities=2000)
    data = make_fake_dataset(tmp_path / "data", bundle, num_users=300)
    args = argparse.Namespace(bundle=bundle, data=data, seconds=1.0, deadline_ms=100.0, users=300, slow_sockets=20, out=None, overload_runs=1,
                              overload_k=200)
    rows = {r.scenario: r for r in asyncio.run(run_chaos(args))}
    assert set(rows) == {
        "baseline", "redis-stop", "redis-restart-empty", "redis-hang", "reload", "overload-5x", "batch-mix",
        "slow-clients", "sigterm-drain",
    }
    for name, row in rows.items():
        if name != "overload-5x":  # a saturated client on 2 shared cores may time out its own requests
            assert row.phase.failed == 0, (name, [a.status for a in row.phase.answers if a.status not in (200, 503)])
        assert row.phase.count(lambda a: a.status not in (0, 200, 503)) == 0, name  # never a 500
    empty = rows["redis-restart-empty"].phase
    assert empty.answered > 0 and empty.count(lambda a: a.status == 200 and not a.degraded) == 0
    assert "corrupted 422" in rows["reload"].recovery and "corrupted served: False" in rows["reload"].recovery
    assert rows["slow-clients"].recovery.startswith("20/20 closed")
    table = render(list(rows.values()), args)
    assert table.count("\n| ") == len(rows) + 1  # header + one row per scenario


def test_recovery_is_read_from_the_services_own_totals_per_window() -> None:
    """Back = the first 0.5 s window after which every window's p99 stays within 1.5 x the baseline's."""
    from loadtests.chaos import Answer, recovery, windows

    burst_end = 10.0
    after = []
    for i in range(40):  # 4 s after the burst, 10 answers per 0.4 s
        t = burst_end + i * 0.1
        server = 0.300 if t < burst_end + 1.2 else 0.012  # slow for 1.2 s, then baseline-like
        after.append(Answer(t, 200, latency=server + 0.002, server_s=server))
    after.append(Answer(burst_end + 0.05, 503, latency=0.001))
    rec = recovery(after, burst_end, base_server_ms=10.0, base_client_ms=12.0)
    assert rec["threshold_ms"] == 20.0  # max(1.5 x 10, 10 + 10)
    assert rec["server_s"] == 1.5 and rec["client_s"] == 1.5  # the window [1.5, 2.0) is the first good one
    assert rec["server_later_above"] == 0 and rec["server_later"] == 4
    noisy = [*after, Answer(burst_end + 3.6, 200, 0.5, server_s=0.5)]  # one slow answer in a later window
    rec = recovery(noisy, burst_end, base_server_ms=10.0, base_client_ms=12.0)
    assert rec["server_s"] == 1.5 and rec["server_later_above"] == 1  # counted, not moving the recovery
    ws = windows([Answer(a.sent - burst_end, a.status, a.latency, server_s=a.server_s) for a in after], 0.5)
    assert ws[0]["shed"] == 1 and ws[0]["answered"] == 5
    never = recovery([Answer(burst_end + 0.1, 200, 1.0, server_s=1.0)], burst_end, 10.0, 10.0)
    assert never["server_s"] is None
    # a baseline whose own windows reach 40 ms: the threshold is that, not 1.5 x its p99
    base = [Answer(i * 0.1, 200, 0.01, server_s=0.040 if i % 5 == 0 else 0.010) for i in range(40)]
    assert 35.0 < (recovery(after, burst_end, 10.0, 12.0, baseline=base)["threshold_ms"] or 0) <= 40.0


def test_a_segment_of_rate_zero_sends_nothing() -> None:
    """A capacity run that got no answer (a wedged service) gives a rate of 0: the open loop then sends
    nothing for that time instead of failing on an exponential of rate 0."""
    import asyncio

    from loadtests.chaos import Segment, open_loop

    phase = asyncio.run(open_loop("http://127.0.0.1:9", ["u"], ["d"], rate=0, seconds=0,
                                  segments=[Segment(0.01, 0.0, 10)]))
    assert phase.answers == [] and phase.dropped == 0
