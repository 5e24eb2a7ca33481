"""The bundle's search calibration (docs/bundle-format.md, ``calibration.json``): format and lookup.

`unimatch index calibrate` (``service.calibrate``) measures, per domain and per k bucket, the cheapest
search operating point that finds a target share of the model's own exhaustive top-k on held-out
users, or decides that scoring the domain whole is cheaper. This module is what the engine reads at
load: the stored points, their measured coverage, and ``lookup(domain, k)``. numpy and json only.

A request's k is served by the smallest calibrated bucket >= k (its beam is at least as wide as the one
measured); a k above every bucket takes the largest bucket's point with the bottom ef scaled by k.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from service.engine import SearchParams

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
Mode = Literal["graph", "exhaustive"]


@dataclass(frozen=True)
class CalibrateConfig:
    target: float = 0.99  # mean coverage@k to reach
    queries: int = 500  # held-out (user, domain) queries in all, split evenly over domains
    ks: tuple[int, ...] = (10, 50, 200, 1000)  # k buckets; those above a domain's eligible count are skipped
    split: str = "validation"
    # Exhaustive scoring of the reference costs queries x eligible pairs: 2e8 is ~10 min of one core at
    # ~3 us/pair, the 1M catalogue's budget. It caps the queries per domain (never below min_queries).
    max_exhaustive_pairs: float = 2e8
    min_queries: int = 20
    upper_scales: tuple[float, ...] = (1.0, 2.0)  # upper layers' ef and top-n, times the engine defaults
    bottom_steps: tuple[int, ...] = (10, 30)  # bottom T (the beam stops early once it stops improving)
    seed_history: tuple[bool, ...] = (False, True)
    # The graph is chosen only when its measured p50 beats exhaustive scoring by this factor: latencies of
    # one run on a shared machine move by ~10-20%, pairs do not, and a graph point that scores 90% of the
    # domain in many small calls is no real saving over one large call.
    min_speedup: float = 1.2
    # A graph point scoring at least this share of the exhaustive pairs is timed again against exhaustive
    # scoring on the same paired_queries queries, interleaved; below it the pairs alone make it faster.
    paired_timing_above: float = 0.1
    paired_queries: int = 40
    # Grid screening: with more than 2 x screen_queries queries per domain, every option combination is
    # first measured on a quarter of them, and only the `finalists` cheapest are measured on all.
    screen_queries: int = 40
    finalists: int = 2
    seed: int = 0
    intra_op_threads: int = 1
    # Threads scoring the exhaustive reference (0 = the CPUs this process may use); its first
    # timed_reference_queries queries per domain run alone, as their latency is the cost to beat, but
    # only for timed_reference_seconds once 3 of them ran (a 1M domain's query takes seconds).
    workers: int = 0
    timed_reference_queries: int = 20
    timed_reference_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"--target must be in (0, 1], got {self.target}")
        if self.queries <= 0:
            raise ValueError(f"--queries must be positive, got {self.queries}")
        if not self.ks or min(self.ks) <= 0:
            raise ValueError(f"--k values must be positive, got {self.ks}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 = every CPU), got {self.workers}")
        if self.timed_reference_queries < 1 or self.timed_reference_seconds < 0:
            raise ValueError("timed_reference_queries must be >= 1 and timed_reference_seconds >= 0, got "
                             f"{self.timed_reference_queries} and {self.timed_reference_seconds}")


class CalibrationError(ValueError):
    """calibration.json is unreadable, of another version, or not about this bundle's graph."""


def graph_fingerprint(manifest: dict[str, Any]) -> str:
    """Identity of the bundle's graph: sha256 over its files' checksums (a rebuilt graph changes it)."""
    files = (manifest.get("graph") or {}).get("files", {})
    text = json.dumps({rel: meta.get("sha256") for rel, meta in sorted(files.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CalibratedPoint:
    """One (domain, k) decision with the numbers it was made from (all measured on held-out queries)."""

    k: int
    mode: Mode
    coverage: float  # mean coverage@k of the chosen mode (1.0 for exhaustive)
    coverage_ci95: float  # half-width of the 95% interval over queries
    pairs: float  # mean pair evaluations per query of the chosen mode
    latency_ms_p50: float
    latency_ms_p99: float
    exhaustive_pairs: float
    exhaustive_ms_p50: float
    queries: int
    reason: str  # one line: why this mode
    # The graph operating point (also measured when the mode is exhaustive, so operators see what it cost).
    ef: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    top_n: tuple[int, ...] = ()
    max_degree: tuple[int, ...] = ()
    whole_top_layer_up_to: int = 4096
    seed_history: bool = False
    filter_beam: bool = True
    graph_coverage: float = float("nan")  # coverage of the best graph point tried (nan: none met the target)
    graph_pairs: float = float("nan")
    graph_ms_p50: float = float("nan")

    @property
    def coverage_lower(self) -> float:
        return self.coverage - (0.0 if math.isnan(self.coverage_ci95) else self.coverage_ci95)

    def params(self, base: SearchParams) -> SearchParams:
        """The stored graph point as engine parameters (``base`` supplies what was not calibrated)."""
        return replace(
            base, ef=self.ef or base.ef, steps=self.steps or base.steps, top_n=self.top_n or base.top_n,
            max_degree=self.max_degree, whole_top_layer_up_to=self.whole_top_layer_up_to,
            seed_history=self.seed_history, filter_beam=self.filter_beam,
            # measured as it is: a bottom ef below k (the ladder's lower rungs) is not raised to k
            bottom_ef_floor=False,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("ef", "steps", "top_n", "max_degree"):
            d[key] = list(d[key])
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CalibratedPoint:
        kw = dict(d)
        for key in ("ef", "steps", "top_n", "max_degree"):
            kw[key] = tuple(int(v) for v in kw.get(key) or ())
        for key in ("coverage_ci95", "graph_coverage", "graph_pairs", "graph_ms_p50"):
            if kw.get(key) is None:
                kw[key] = float("nan")
        if kw.get("mode") not in ("graph", "exhaustive"):
            raise CalibrationError(f"calibration point mode must be graph or exhaustive, got {kw.get('mode')!r}")
        return cls(**kw)


@dataclass(frozen=True)
class Calibration:
    """Every domain's calibrated points, smallest k first."""

    target: float
    graph: str  # graph_fingerprint of the graph it was measured on
    domains: dict[str, tuple[CalibratedPoint, ...]]
    queries: int = 0
    split: str = "validation"
    method: str = ""
    created_at: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def lookup(self, domain: str, k: int) -> tuple[CalibratedPoint, int] | None:
        """(point, bottom ef for this k) for a request, or None when the domain was not calibrated."""
        points = self.domains.get(domain)
        if not points:
            return None
        for p in points:
            if p.k >= k:
                return p, (p.ef[-1] if p.ef else k)
        last = points[-1]
        factor = (last.ef[-1] / last.k) if last.ef else 1.0
        return last, int(math.ceil(factor * k))

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": CALIBRATION_VERSION,
            "target": self.target,
            "graph": self.graph,
            "queries": self.queries,
            "split": self.split,
            "method": self.method,
            "created_at": self.created_at,
            "seconds": round(self.seconds, 1),
            "domains": {d: [p.to_json() for p in pts] for d, pts in self.domains.items()},
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        if d.get("format_version") != CALIBRATION_VERSION:
            raise CalibrationError(f"calibration format_version {d.get('format_version')} is not {CALIBRATION_VERSION}")
        try:
            domains = {
                name: tuple(sorted((CalibratedPoint.from_json(p) for p in pts), key=lambda p: p.k))
                for name, pts in d["domains"].items()
            }
            return cls(
                target=float(d["target"]), graph=str(d["graph"]), domains=domains, queries=int(d.get("queries", 0)),
                split=str(d.get("split", "validation")), method=str(d.get("method", "")),
                created_at=str(d.get("created_at", "")), seconds=float(d.get("seconds", 0.0)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"calibration.json: malformed ({exc})") from None

    def summary(self) -> dict[str, Any]:
        """Compact view for `/v1/info` and the start-up log: per domain, per k, mode and coverage."""
        return {
            "target": self.target,
            "queries": self.queries,
            "created_at": self.created_at,
            "domains": {
                d: [
                    {"k": p.k, "mode": p.mode, "coverage": round(p.coverage, 4),
                     "coverage_ci95": None if math.isnan(p.coverage_ci95) else round(p.coverage_ci95, 4),
                     "pairs": round(p.pairs, 1), "exhaustive_pairs": round(p.exhaustive_pairs, 1),
                     **({"ef": list(p.ef), "steps": list(p.steps), "seed_history": p.seed_history}
                        if p.mode == "graph" else {})}
                    for p in pts
                ]
                for d, pts in self.domains.items()
            },
        }


def load_calibration(path: Path) -> Calibration:
    try:
        return Calibration.from_json(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read ({exc})") from None
