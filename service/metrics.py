"""Prometheus metrics of the service: the only module-level globals of the serving path (STYLE.md).

Names are in base units (seconds, not ms); labels are small closed sets (stage, domain name, entity
type, error kind, outcome), never ids. Under several uvicorn workers set ``PROMETHEUS_MULTIPROC_DIR``
(``unimatch serve --workers N`` does) *before* this module is imported: every process then writes its
samples to files there and ``GET /metrics`` aggregates them (prometheus_client multiprocess mode).

Exposure share per entity type (the paper's fairness concern, Table VI) is
``rate(unimatch_results_total{entity_type="shop"}) / sum(rate(unimatch_results_total))``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from service.features import Lookup
    from service.schemas import MatchResponse

# Latency buckets from 0.25 ms (a warm Redis GET) to 2.5 s (a pathological deadline).
_LATENCY = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5)
_PAIRS = (10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)

REQUEST_DURATION = Histogram(
    "unimatch_request_duration_seconds",
    "End-to-end time of one match (features + encoding + search), per domain",
    ["domain"],
    buckets=_LATENCY,
)
STAGE_DURATION = Histogram(
    "unimatch_stage_duration_seconds",
    "Time per stage of a match: features, user_encoding, search, scorer (inside search), total",
    ["stage"],
    buckets=_LATENCY,
)
HTTP_REQUESTS = Counter("unimatch_http_requests_total", "HTTP requests answered", ["route", "status"])
PAIR_EVALUATIONS = Histogram(
    "unimatch_pair_evaluations", "Pair-scorer evaluations (user x entity) per match", buckets=_PAIRS
)
RESULTS = Counter("unimatch_results_total", "Entities returned, by entity type (exposure share)", ["entity_type"])
FLAGGED = Counter("unimatch_matches_flagged_total", "Matches answered with a flag", ["flag"])  # cold_start|partial|degraded
ERRORS = Counter("unimatch_errors_total", "Errors answered, by kind", ["kind"])
REDIS_DURATION = Histogram(
    "unimatch_redis_duration_seconds", "Redis feature reads, by outcome", ["outcome"], buckets=_LATENCY
)
REDIS_FAILURES = Counter("unimatch_redis_failures_total", "Redis feature reads that failed, by kind", ["kind"])
IN_FLIGHT = Gauge("unimatch_in_flight_requests", "Match requests being served", multiprocess_mode="livesum")
BUNDLE_INFO = Gauge(
    "unimatch_bundle_info", "The bundle being served (value 1)", ["version", "method"], multiprocess_mode="livemax"
)
RELOADS = Counter("unimatch_reloads_total", "Bundle reloads, by outcome", ["outcome"])
# Live search quality (service.shadow): sampled requests re-scored exhaustively. Fine buckets near 1,
# where a good search lives; the mean is sum / count. The gauge is the calibration's measured figure
# for the same (domain, k bucket): the alert fires when the live mean falls below it by a margin.
_COVERAGE = (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
SHADOW_COVERAGE = Histogram(
    "unimatch_search_shadow_coverage",
    "coverage@k of served answers against exhaustive scoring of the same request (sampled, off the request path)",
    ["domain", "k_bucket"],
    buckets=_COVERAGE,
)
CALIBRATED_COVERAGE = Gauge(
    "unimatch_search_calibrated_coverage",
    "coverage@k the bundle's calibration measured for this domain and k bucket",
    ["domain", "k_bucket"],
    multiprocess_mode="livemax",
)
SHADOW_DROPPED = Counter("unimatch_search_shadow_dropped_total", "Shadow samples dropped because the monitor's queue was full")
# Connection guards (service/http_guard.py) and admission control (service/admission.py)
CONNECTIONS_CLOSED = Counter("unimatch_connections_closed_total", "Connections closed by a server guard", ["reason"])
SHED = Counter("unimatch_requests_shed_total", "Requests answered 503 at admission, by reason", ["reason"])
HEADROOM = Gauge(
    "unimatch_admission_headroom",
    "Share of a request's remaining budget admission lets its work fill (1 = all; lower after partial answers)",
    multiprocess_mode="livemin",
)
DEGRADED = Counter(
    "unimatch_degraded_answers_total",
    "Answers flagged degraded, by cause: slow (Redis timeout), down (connection), breaker_open, decode, empty_store",
    ["cause"],
)

# Live catalogue (service/live.py, service/changes.py). Lag: from the change's XADD (its stream id's
# time) to applied in this process, so the acknowledging worker's few ms and the others' poll delay.
_LAG = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
CHANGE_LAG = Histogram(
    "unimatch_live_change_lag_seconds", "Logged (acknowledged) -> applied (visible) in this process", buckets=_LAG
)
CHANGE_APPLY_DURATION = Histogram(
    "unimatch_live_change_apply_seconds", "Time to apply one change-log entry (encode + graph insertion)", buckets=_LATENCY
)
CHANGES_APPLIED = Counter("unimatch_live_changes_total", "Change-log entries, by op and outcome", ["op", "outcome"])
OVERLAY_ROWS = Gauge("unimatch_live_overlay_rows", "Rows added online since the bundle (overlay size)", multiprocess_mode="livemax")
OVERLAY_CAPACITY = Gauge("unimatch_live_overlay_capacity", "Rows the overlay can hold", multiprocess_mode="livemax")
LOG_POSITION = Gauge(
    "unimatch_live_log_position_ms", "Time part (ms) of the last change-log entry applied", multiprocess_mode="livemin"
)


def set_live(live: object) -> None:
    """Overlay size and log position of a ``service.live.LiveCatalogue`` (duck-typed: no import cycle)."""
    from service.live import stream_ms

    OVERLAY_ROWS.set(getattr(live, "count", 0))
    OVERLAY_CAPACITY.set(getattr(live, "capacity", 0))
    LOG_POSITION.set(stream_ms(str(getattr(live, "position", "0-0"))))


def observe_redis(outcome: str, seconds: float) -> None:
    """Hook given to the Redis feature store (it knows nothing of Prometheus)."""
    REDIS_DURATION.labels(outcome=outcome).observe(seconds)
    if outcome != "ok":
        REDIS_FAILURES.labels(kind=outcome).inc()


def set_bundle(version: str, method: str, previous: tuple[str, str] | None = None) -> None:
    if previous is not None and previous != (version, method):
        BUNDLE_INFO.labels(version=previous[0], method=previous[1]).set(0)
    BUNDLE_INFO.labels(version=version, method=method).set(1)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def render() -> tuple[bytes, str]:
    """Text exposition: this process's registry, or every worker's files in multiprocess mode."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a stopped worker's live gauges (in-flight, bundle info) from the aggregate."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# Lookup.error -> the cause label of unimatch_degraded_answers_total: "slow" and "down" apart.
_DEGRADED_CAUSE = {
    "timeout": "slow",
    "connection": "down",
    "redis": "down",
    "skipped": "breaker_open",
    "decode": "decode",
    "empty_store": "empty_store",
}


def record_match(response: MatchResponse, lookup: Lookup, total_s: float) -> None:
    """Every metric of one answered match: latency per stage, pairs scored, exposure, flags."""
    stats = response.stats
    REQUEST_DURATION.labels(domain=response.domain).observe(total_s)
    STAGE_DURATION.labels(stage="features").observe(lookup.seconds)
    STAGE_DURATION.labels(stage="user_encoding").observe(stats.user_encode_ms / 1e3)
    STAGE_DURATION.labels(stage="search").observe(stats.search_ms / 1e3)
    STAGE_DURATION.labels(stage="scorer").observe(stats.scorer_ms / 1e3)
    STAGE_DURATION.labels(stage="total").observe(total_s)
    PAIR_EVALUATIONS.observe(stats.pair_evaluations)
    per_type: dict[str, int] = {}
    for item in response.items:
        per_type[item.entity_type] = per_type.get(item.entity_type, 0) + 1
    for entity_type, count in per_type.items():
        RESULTS.labels(entity_type=entity_type).inc(count)
    for flag, on in (("cold_start", response.cold_start), ("partial", response.partial), ("degraded", response.degraded)):
        if on:
            FLAGGED.labels(flag=flag).inc()
    if lookup.degraded:
        DEGRADED.labels(cause=_DEGRADED_CAUSE.get(lookup.error or "", "other")).inc()
