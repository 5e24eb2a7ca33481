"""`unimatch index calibrate`: measure, per domain and k, the cheapest search that finds the model's top-k.

Why: the beam search's coverage of the model's own top-k depends on the catalogue and on the model.
On the synthetic set L2 neighbourhoods and model scores agree and the default point finds everything
at 0.16% scored; on real catalogues the same point lost 15-30% of the top-k, and a small catalogue is
cheaper to score whole. So every bundle measures its own operating points (paper IV-B's per-layer
ef / T / top-n are the knobs) instead of trusting one default:

1. held-out (user, domain) queries of the validation split (up to ``queries``, split evenly over the
   domains; fewer on a large catalogue, where exhaustive scoring of each costs seconds:
   ``max_exhaustive_pairs`` bounds the total), each scored exhaustively: the reference top-k and the
   exhaustive cost (pairs, latency);
2. per domain and k bucket, a grid of search points: the bottom-layer ef as a multiple of k (galloping
   up a ladder until the target is met, then one step back), the upper layers' ef and top-n scaled, the
   bottom T, and whether the user's own history seeds the bottom layer. A point meets the target when
   its mean coverage@k over the domain's queries is >= ``target``;
3. the cheapest point that meets it (fewest pairs, then lowest p50), or, when none does, or the best
   one is not faster than scoring the domain whole in the same run, exhaustive mode with the reason.

Timings come from this run on this machine; pairs are the machine-independent cost.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import Bundle, load_bundle
from contracts.calibration import CALIBRATION_FILE, CalibrateConfig, CalibratedPoint, Calibration, graph_fingerprint
from service.bench.search_bench import BenchError, Queries, held_out_queries
from service.cpus import cpu_budget
from service.engine import MatchEngine, MatchResult, SearchParams

Progress = Callable[[str, int, int], None]  # (description, done, total); total 0 = unknown

# The bottom layer's ef as a multiple of k; the search gallops over every other rung, then bisects.
# Bottom ef as a multiple of k, cheapest first. Rungs below 1: the answer is the top-k of every row the
# bottom layer scored, so a narrower beam may find it for fewer pairs (SearchParams.bottom_ef_floor).
EF_LADDER: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)


@dataclass(frozen=True)
class PointResult:
    params: SearchParams
    coverage: float
    ci95: float
    pairs: float
    ms_p50: float
    ms_p99: float
    widened: float = 0.0  # share of the queries a narrow beam answered only by searching again at ef = k

    @property
    def key(self) -> tuple[float, float]:
        return (self.pairs, self.ms_p50)

    def meets(self, target: float) -> bool:
        """Coverage reached by the point itself: a narrow beam that had to search again as wide as k on
        some query pays both searches there (amazon phone/electronic k=1000: ef 300 cost 4,420 pairs
        against 3,023 at ef 1000), and the ladder assumes a wider rung costs more."""
        return self.coverage >= target and self.widened == 0.0


def _ci95(x: np.ndarray) -> float:
    return float(1.96 * x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def evaluate_point(engine: MatchEngine, q: Queries, idx: np.ndarray, k: int, ref: list[np.ndarray],
                   params: SearchParams) -> PointResult:
    """Coverage@k, pairs and latency of one graph operating point over the queries ``idx``."""
    cov = np.empty(idx.size)
    pairs = np.empty(idx.size)
    lat = np.empty(idx.size)
    widened = 0
    for j, i in enumerate(idx):
        res = engine.match(q.features[i], int(q.domains[i]), k, mode="graph", params=params)
        cov[j] = np.intersect1d(res.rows, ref[i][:k]).size / k
        pairs[j] = res.stats.pair_evaluations
        lat[j] = res.stats.total_ms
        widened += res.stats.widened
    return PointResult(params.for_k(k), float(cov.mean()), _ci95(cov), float(pairs.mean()),
                       float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), widened / max(1, idx.size))


def grid(base: SearchParams, k: int, cfg: CalibrateConfig) -> list[list[SearchParams]]:
    """Per option combination (upper scale, bottom T, history seeding): the ladder of bottom ef, cheapest first."""
    combos = []
    for seed_history in cfg.seed_history:
        for scale in cfg.upper_scales:
            for t in cfg.bottom_steps:
                upper_ef = tuple(max(1, round(e * scale)) for e in base.ef[:-1])
                upper_n = tuple(max(0, round(n * scale)) for n in base.top_n[:-1])
                ladder = [
                    replace(base, ef=(*upper_ef, max(1, math.ceil(a * k))), top_n=(*upper_n, k),
                            steps=(*base.steps[:-1], t), seed_history=seed_history, bottom_ef_floor=False)
                    for a in EF_LADDER
                ]
                combos.append(ladder)
    return combos


def _cheapest_meeting(evaluate: Callable[[SearchParams], PointResult], ladder: list[SearchParams], target: float,
                      bound: tuple[float, float] | None, budget_pairs: float) -> tuple[int, PointResult] | None:
    """Gallop up ``ladder`` (every other rung) to the first point meeting ``target``, then try the rung below.

    Returns (rung, result) or None. Stops early when a point already costs more than ``bound`` (the best
    found so far: a wider beam only costs more) or than ``budget_pairs`` (scoring the domain whole).
    """
    last_fail = -1
    for i in range(0, len(ladder), 2):
        r = evaluate(ladder[i])
        if r.pairs >= budget_pairs or (bound is not None and r.key >= bound and not r.meets(target)):
            return None
        if r.meets(target):
            best, rung = r, i
            if i - 1 > last_fail:
                below = evaluate(ladder[i - 1])
                if below.meets(target) and below.key < best.key:
                    best, rung = below, i - 1
            return rung, best
        last_fail = i
    return None


def _walk_up(evaluate: Callable[[SearchParams], PointResult], ladder: list[SearchParams], start: int, target: float,
             budget_pairs: float) -> PointResult | None:
    """First rung from ``start`` up that meets ``target`` (one rung at a time), or None past the budget."""
    for j in range(max(0, start), len(ladder)):
        r = evaluate(ladder[j])
        if r.pairs >= budget_pairs:
            return None
        if r.meets(target):
            return r
    return None


def calibrate_domain(engine: MatchEngine, q: Queries, idx: np.ndarray, ref: list[np.ndarray], k: int,
                     ex_pairs: float, ex_p50: float, cfg: CalibrateConfig,
                     progress: Callable[[], None] | None = None) -> CalibratedPoint:
    """The (domain, k) decision: the cheapest graph point meeting the target, or exhaustive with why.

    With more than ``2 * cfg.screen_queries`` queries the grid is screened on a quarter of them (at least
    ``screen_queries``): every option combination's cheapest rung there, then the ``cfg.finalists``
    cheapest combinations are re-measured on every query, walking up from one rung below their
    screening rung. The decision rests only on the full-set measurements.
    """
    best: PointResult | None = None
    tried: list[PointResult] = []

    def on(rows: np.ndarray, keep: bool) -> Callable[[SearchParams], PointResult]:
        def evaluate(p: SearchParams) -> PointResult:
            r = evaluate_point(engine, q, rows, k, ref, p)
            if keep:
                tried.append(r)
            if progress is not None:
                progress()
            return r
        return evaluate

    ladders = grid(engine.params, k, cfg)
    if idx.size > 2 * cfg.screen_queries:
        screen = idx[: max(cfg.screen_queries, idx.size // 4)]
        found: list[tuple[tuple[float, float], int, int]] = []
        bound: tuple[float, float] | None = None
        for li, ladder in enumerate(ladders):
            hit = _cheapest_meeting(on(screen, False), ladder, cfg.target, bound, ex_pairs)
            if hit is not None:
                found.append((hit[1].key, li, hit[0]))
                bound = hit[1].key if bound is None else min(bound, hit[1].key)
        for _, li, rung in sorted(found)[: cfg.finalists]:
            r = _walk_up(on(idx, True), ladders[li], rung - 1, cfg.target, ex_pairs)
            if r is not None and (best is None or r.key < best.key):
                best = r
    else:
        for ladder in ladders:
            hit = _cheapest_meeting(on(idx, True), ladder, cfg.target, None if best is None else best.key, ex_pairs)
            if hit is not None and (best is None or hit[1].key < best.key):
                best = hit[1]
    if best is not None and best.pairs >= cfg.paired_timing_above * ex_pairs:
        # Close in pairs: latency decides, and latencies measured minutes apart on a shared machine are
        # not comparable. Time both modes on the same queries, interleaved, and compare medians.
        best, ex_p50 = paired_timing(engine, q, idx[: cfg.paired_queries], k, best)
    common: dict[str, Any] = {"k": k, "exhaustive_pairs": ex_pairs, "exhaustive_ms_p50": ex_p50, "queries": int(idx.size)}
    top = max(tried, key=lambda r: (r.coverage, -r.pairs)) if tried else None
    if best is not None and best.ms_p50 * cfg.min_speedup <= ex_p50 and best.pairs < ex_pairs:
        p = best.params
        return CalibratedPoint(
            mode="graph", coverage=best.coverage, coverage_ci95=best.ci95, pairs=best.pairs,
            latency_ms_p50=best.ms_p50, latency_ms_p99=best.ms_p99,
            reason=f"graph meets coverage {cfg.target} at {best.pairs / ex_pairs:.1%} of the exhaustive pairs, "
                   f"{ex_p50 / best.ms_p50:.1f}x faster",
            ef=p.ef, steps=p.steps, top_n=p.top_n, max_degree=p.max_degree,
            whole_top_layer_up_to=p.whole_top_layer_up_to, seed_history=p.seed_history, filter_beam=p.filter_beam,
            graph_coverage=best.coverage, graph_pairs=best.pairs, graph_ms_p50=best.ms_p50, **common,
        )
    shown: PointResult | None
    if best is not None:
        why = (f"the cheapest graph point meeting coverage {cfg.target} ({best.pairs:.0f} pairs, p50 {best.ms_p50:.2f} ms) "
               f"is not {cfg.min_speedup}x faster than scoring the domain whole ({ex_pairs:.0f} pairs, p50 {ex_p50:.2f} ms)")
        shown = best
    else:
        why = (f"no graph point reached coverage {cfg.target} for fewer pairs than scoring the domain whole "
               f"(best tried: {top.coverage:.4f} at {top.pairs:.0f} pairs)" if top else "no graph point tried")
        shown = top
    sp = shown.params if shown is not None else engine.params.for_k(k)
    return CalibratedPoint(
        mode="exhaustive", coverage=1.0, coverage_ci95=0.0, pairs=ex_pairs, latency_ms_p50=ex_p50,
        latency_ms_p99=ex_p50, reason=why, ef=sp.ef, steps=sp.steps, top_n=sp.top_n, max_degree=sp.max_degree,
        whole_top_layer_up_to=sp.whole_top_layer_up_to, seed_history=sp.seed_history, filter_beam=sp.filter_beam,
        graph_coverage=float("nan") if shown is None else shown.coverage,
        graph_pairs=float("nan") if shown is None else shown.pairs,
        graph_ms_p50=float("nan") if shown is None else shown.ms_p50, **common,
    )


def paired_timing(engine: MatchEngine, q: Queries, idx: np.ndarray, k: int, point: PointResult) -> tuple[PointResult, float]:
    """(point with its p50 re-measured, exhaustive p50), graph and exhaustive run alternately per query."""
    g, e = [], []
    for i in idx:
        g.append(engine.match(q.features[i], int(q.domains[i]), k, mode="graph", params=point.params).stats.total_ms)
        e.append(engine.match(q.features[i], int(q.domains[i]), k, mode="exhaustive").stats.total_ms)
    return replace(point, ms_p50=float(np.median(g)), ms_p99=float(np.percentile(g, 99))), float(np.median(e))


def reuse_wider_points(engine: MatchEngine, q: Queries, idx: np.ndarray, ref: list[np.ndarray],
                       points: list[CalibratedPoint], cfg: CalibrateConfig, *, log: Callable[[str], None] = print,
                       name: str = "") -> list[CalibratedPoint]:
    """A larger bucket's point may serve a smaller k more cheaply than that k's own grid found (a beam
    of ef = k is a poor explorer at k = 10): measure each chosen graph point at every smaller k, keep it
    there when it meets the target for fewer pairs."""
    out = list(points)
    for i, small in enumerate(points):
        for wide in points[i + 1:]:
            if wide.mode != "graph":
                continue
            r = evaluate_point(engine, q, idx, small.k, ref, wide.params(engine.params))
            if not r.meets(cfg.target) or r.pairs >= (out[i].pairs if out[i].mode == "graph" else small.exhaustive_pairs):
                continue
            ex_p50 = small.exhaustive_ms_p50
            if out[i].mode == "exhaustive" and r.pairs >= cfg.paired_timing_above * small.exhaustive_pairs:
                r, ex_p50 = paired_timing(engine, q, idx[: cfg.paired_queries], small.k, r)
            if out[i].mode == "exhaustive" and r.ms_p50 * cfg.min_speedup > ex_p50:
                continue
            p = r.params
            out[i] = replace(
                out[i], mode="graph", coverage=r.coverage, coverage_ci95=r.ci95, pairs=r.pairs, latency_ms_p50=r.ms_p50,
                latency_ms_p99=r.ms_p99, ef=p.ef, steps=p.steps, top_n=p.top_n, max_degree=p.max_degree,
                whole_top_layer_up_to=p.whole_top_layer_up_to, seed_history=p.seed_history, filter_beam=p.filter_beam,
                graph_coverage=r.coverage, graph_pairs=r.pairs, graph_ms_p50=r.ms_p50,
                reason=f"the k={wide.k} point meets coverage {cfg.target} at k={small.k} for fewer pairs "
                       f"({r.pairs / small.exhaustive_pairs:.1%} of the exhaustive pairs, "
                       f"{ex_p50 / r.ms_p50:.1f}x faster)",
            )
            log(f"{name} k={small.k}: {out[i].reason}: {r.pairs:.0f} pairs, coverage {r.coverage:.4f}")
    return out


def _run_alone(fn: Callable[[int], MatchResult], items: np.ndarray, most: int, seconds: float,
               *, at_least: int = 3, clock: Callable[[], float] = time.perf_counter) -> list[MatchResult]:
    """``fn`` over the first ``items`` one at a time: ``most`` of them, or fewer once ``at_least`` ran and
    ``seconds`` have passed."""
    out: list[MatchResult] = []
    t0 = clock()
    for i in items[:most]:
        if len(out) >= at_least and clock() - t0 >= seconds:
            break
        out.append(fn(int(i)))
    return out


def _map_ordered(fn: Callable[[int], MatchResult], items: np.ndarray, workers: int, *, sequential: int) -> Iterator[MatchResult]:
    """``fn`` over ``items`` in order: the first ``sequential`` one at a time, the rest on ``workers`` threads."""
    for i in items[:sequential]:
        yield fn(int(i))
    rest = [int(i) for i in items[sequential:]]
    if workers <= 1:
        yield from (fn(i) for i in rest)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unimatch-calibrate") as pool:
        yield from pool.map(fn, rest)


def calibrate(bundle: Bundle, data: Path, cfg: CalibrateConfig, *, progress: Progress | None = None,
              log: Callable[[str], None] = print) -> Calibration:
    """Measure every domain's operating points on ``bundle`` (which must have a graph)."""
    if bundle.graph is None:
        raise BenchError(f"{bundle.path}: no graph; run `unimatch index build --bundle {bundle.path}` first")
    t_start = time.perf_counter()
    engine = MatchEngine(bundle, params=SearchParams(), use_calibration=False, intra_op_threads=cfg.intra_op_threads,
                         providers=["CPUExecutionProvider"])
    workers = cfg.workers or cpu_budget().cpus
    names = bundle.schema.domains
    # Per-domain quota capped by the exhaustive budget: a 1M domain affords ~200 reference queries.
    eligible = {d: engine.eligible_count(d) for d in range(len(names))}
    quota = -(-cfg.queries // len(names))
    caps = {d: max(cfg.min_queries, int(cfg.max_exhaustive_pairs / max(1, eligible[d]) / len(names))) for d in eligible}
    q = held_out_queries(data, bundle, max(min(quota, caps[d]) for d in caps) * len(names), cfg.seed,
                         split=cfg.split, per_domain=True)
    engine.warmup()
    per_domain: dict[int, np.ndarray] = {}
    for d in range(len(names)):
        idx = np.flatnonzero(q.domains == d)
        n_d = min(idx.size, quota, caps[d])
        if n_d < idx.size:
            log(f"{names[d]}: {n_d} of {idx.size} queries ({eligible[d]:,} eligible: exhaustive budget "
                f"{cfg.max_exhaustive_pairs:.0e} pairs)")
        per_domain[d] = idx[:n_d]
    total_q = sum(int(v.size) for v in per_domain.values())
    if total_q == 0:
        raise BenchError(f"{data}: no {cfg.split} queries in any domain")
    ref: list[np.ndarray] = [np.empty(0, np.int64)] * len(q.features)
    ex_pairs: dict[int, float] = {}
    ex_p50: dict[int, float] = {}
    done = 0
    for d, idx in per_domain.items():
        ks = [k for k in cfg.ks if k <= eligible[d]]
        if not idx.size or not ks:
            continue
        kmax = max(ks)
        lat: list[float] = []
        pairs: list[int] = []

        def reference(i: int, d: int = d, kmax: int = kmax) -> MatchResult:
            return engine.match(q.features[i], d, kmax, mode="exhaustive")

        # The first queries one at a time: their latency is the exhaustive cost the graph must beat, and
        # concurrent queries would inflate it. Up to timed_reference_queries of them, but no more than
        # timed_reference_seconds once 3 are in: at 1M entities one takes seconds and varies little (a
        # fixed amount of work), and 20 of them per domain alone on one core were a third of the
        # reference. The rest only need their top-k rows: on every CPU at once (onnxruntime releases
        # the GIL), which is most of a 1M catalogue's calibration time.
        alone = _run_alone(reference, idx, cfg.timed_reference_queries, cfg.timed_reference_seconds)
        results = itertools.chain(alone, _map_ordered(reference, idx[len(alone):], workers, sequential=0))
        for n, (i, r) in enumerate(zip(idx, results, strict=True)):
            ref[i] = r.rows
            if n < len(alone):
                lat.append(r.stats.total_ms)
            pairs.append(r.stats.pair_evaluations)
            done += 1
            if progress is not None:
                progress("exhaustive reference", done, total_q)
        ex_pairs[d], ex_p50[d] = float(np.mean(pairs)), float(np.percentile(lat, 50))
    log(f"exhaustive reference: {total_q} queries in {time.perf_counter() - t_start:.1f} s ({workers} threads)")
    domains: dict[str, tuple[CalibratedPoint, ...]] = {}
    for d, idx in per_domain.items():
        ks = [k for k in cfg.ks if k <= eligible[d]]
        if not idx.size or not ks:
            log(f"{names[d]}: not calibrated ({'no ' + cfg.split + ' queries' if not idx.size else 'every k exceeds its catalogue'})")
            continue
        points = []
        for k in ks:
            count = [0]

            def tick(d: int = d, k: int = k, count: list[int] = count) -> None:
                count[0] += 1
                if progress is not None:
                    progress(f"{names[d]} k={k}: search point {count[0]}", count[0], 0)

            t0 = time.perf_counter()
            pt = calibrate_domain(engine, q, idx, ref, k, ex_pairs[d], ex_p50[d], cfg, tick)
            points.append(pt)
            log(f"{names[d]} k={k}: {pt.mode}, coverage {pt.coverage:.4f} ± {pt.coverage_ci95:.4f}, "
                f"{pt.pairs:.0f} pairs ({pt.pairs / eligible[d]:.2%} of {eligible[d]:,}), p50 {pt.latency_ms_p50:.2f} ms "
                f"[{count[0]} points, {time.perf_counter() - t0:.1f} s] - {pt.reason}")
        domains[names[d]] = tuple(reuse_wider_points(engine, q, idx, ref, points, cfg, log=log, name=names[d]))
    return Calibration(
        target=cfg.target, graph=graph_fingerprint(bundle.manifest), domains=domains, queries=total_q,
        split=cfg.split, method=str(bundle.manifest.get("method", "")),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), seconds=time.perf_counter() - t_start,
        extra={"ks": list(cfg.ks), "upper_scales": list(cfg.upper_scales), "bottom_steps": list(cfg.bottom_steps),
               "seed_history": list(cfg.seed_history), "ef_ladder": list(EF_LADDER),
               "exhaustive_pairs_budget": cfg.max_exhaustive_pairs},
    )


def write_calibration(bundle_dir: Path, cal: Calibration) -> Path:
    """Write ``calibration.json`` and name it (with its sha256) in the manifest: file first, manifest last."""
    from contracts.io import atomic_write_json, sha256_file
    from contracts.manifest import MANIFEST_FILE, read_manifest, write_manifest

    bundle_dir = Path(bundle_dir)
    path = bundle_dir / CALIBRATION_FILE
    mode = (bundle_dir / MANIFEST_FILE).stat().st_mode & 0o777
    atomic_write_json(path, cal.to_json())
    path.chmod(mode)
    manifest = read_manifest(bundle_dir)
    manifest["calibration"] = {"file": CALIBRATION_FILE, "sha256": sha256_file(path), "graph": cal.graph,
                               "target": cal.target}
    write_manifest(bundle_dir, manifest)
    return path


def calibrate_bundle(bundle_dir: Path, data: Path, cfg: CalibrateConfig, *, progress: Progress | None = None,
                     log: Callable[[str], None] = print) -> Calibration:
    """Load, calibrate and write back: what `unimatch index calibrate` and `index build --data` run."""
    bundle = load_bundle(Path(bundle_dir))
    cal = calibrate(bundle, data, cfg, progress=progress, log=log)
    write_calibration(bundle_dir, cal)
    return cal
