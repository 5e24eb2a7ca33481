"""Where a graph query's time goes: pair scorer, user encoder, and everything outside onnxruntime.

The search loop's work outside the scorer's onnxruntime calls (gathers, visited set, beam, top-n,
Python) is bounded at 10% of the query time. `unimatch bench search` reports the same split, but only
after an exhaustive pass over every query (seconds per query at 1M); this script runs the graph
searches alone, as served (the bundle's calibrated point per domain and k, else the engine defaults),
so the split can be re-measured in a minute after a change to the search code. No coverage numbers.

With ``--loops compiled,fused`` (any of numpy, compiled, fused;
``LOOP@huge`` runs a loop on an engine with its per-row arrays in huge pages, ``service.hugepages``) it measures the search loops side by
side in one run: every query runs once per loop, interleaved, on engines that differ only in the loop
(``search(loop=...)``: the numpy reference, the per-step compiled ``RequestBeam``, and the fused loop,
one compiled call per model call, the engine's default), and counts the queries whose rows and scores
are identical to the first loop's.

Usage::

    .venv/bin/python benchmarks/search_overhead.py --bundle B --data D --users 120 --k 50,200,1000 \\
        [--loops compiled,fused] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import load_bundle
from service import search_kernels as kern
from service.bench.search_bench import held_out_queries
from service.engine import MatchEngine, SearchStats

LOOPS = ("fused", "compiled", "numpy")  # ``search(loop=...)``: the engine's default first


class CpuTimedSession:
    """An onnxruntime session that adds the calling thread's CPU time inside ``run`` to ``cpu_s``.

    With one intra-op thread onnxruntime computes on the calling thread, so thread CPU time splits a
    query's work into inside and outside onnxruntime however busy the machine is: wall-clock shares
    move with the load (a descheduled thread's wait lands in whatever it was doing), CPU time much less.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.cpu_s = 0.0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.cpu_s += time.thread_time() - t

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


class StepTimer:
    """Thread CPU time inside the fused loop's compiled calls (``search_kernels.fused_begin`` /
    ``fused_step``), by wrapping them where ``service.search`` looks them up: what the step itself
    costs, apart from the gathers and the Python around it (``--step-time``; ~1 us a call of its own)."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self._orig = {name: getattr(kern, name) for name in ("fused_begin", "fused_step")}
        for name, fn in self._orig.items():
            setattr(kern, name, self._wrap(fn))

    def _wrap(self, fn: Any) -> Any:
        def timed(*args: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*args)
            finally:
                self.cpu_s += time.thread_time() - t

        return timed


def cpu_timed(engine: MatchEngine) -> tuple[CpuTimedSession, CpuTimedSession]:
    """Wrap the engine's pair-scorer and user-encoder sessions (benchmark instrumentation only)."""
    pair, user = CpuTimedSession(engine.scorer.pair_session), CpuTimedSession(engine.scorer.user_session)
    engine.scorer.pair_session, engine.scorer.user_session = pair, user
    return pair, user


KEYS = ("total_ms", "scorer_ms", "user_encode_ms", "gather_ms", "pair_evaluations", "steps", "scorer_calls")


def summarise(stats: list[SearchStats]) -> dict[str, float]:
    """Means of ``KEYS``, latency percentiles, and each part's share of the summed query time."""
    sums = {key: float(sum(getattr(s, key) for s in stats)) for key in KEYS}
    out = {key: v / len(stats) for key, v in sums.items()}
    lat = np.array([s.total_ms for s in stats])
    out["p50_ms"], out["p99_ms"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
    total = sums["total_ms"]
    out["scorer_share"] = sums["scorer_ms"] / total
    out["user_encode_share"] = sums["user_encode_ms"] / total
    out["outside_ort_share"] = (total - sums["scorer_ms"] - sums["user_encode_ms"]) / total
    out["gather_share"] = sums["gather_ms"] / total
    return out


def measure(
    engines: dict[str, MatchEngine], queries: list, k: int, repeats: int, steps: StepTimer | None = None
) -> dict[str, dict[str, float]]:
    """Per loop: summary over ``repeats`` passes (each query warmed once first), interleaved query by query."""
    stats: dict[str, list[SearchStats]] = {name: [] for name in engines}
    identical = dict.fromkeys(engines, 0)
    same_rows = dict.fromkeys(engines, 0)
    worst = dict.fromkeys(engines, 0.0)  # max |score difference| where the rows are the same
    first = next(iter(engines))
    timed = {name: cpu_timed(engine) for name, engine in engines.items()}
    cpu_total = dict.fromkeys(engines, 0.0)  # thread CPU seconds of the timed passes
    cpu_inside = dict.fromkeys(engines, 0.0)  # of which inside onnxruntime (pair scorer + user encoder)
    cpu_step = dict.fromkeys(engines, 0.0)  # of which inside the fused loop's compiled calls (``steps``)
    for u, d in queries:
        for engine in engines.values():
            engine.match(u, int(d), k, mode="graph")  # warm: page in this query's graph region and tables
        for _ in range(repeats):
            got = {}
            for name, engine in engines.items():
                pair, user = timed[name]
                inside0 = pair.cpu_s + user.cpu_s
                step0 = steps.cpu_s if steps is not None else 0.0
                t = time.thread_time()
                got[name] = r = engine.match(u, int(d), k, mode="graph")
                cpu_total[name] += time.thread_time() - t
                cpu_inside[name] += pair.cpu_s + user.cpu_s - inside0
                cpu_step[name] += (steps.cpu_s if steps is not None else 0.0) - step0
                stats[name].append(r.stats)
            for name in engines:
                rows_eq = bool(np.array_equal(got[name].rows, got[first].rows))
                same_rows[name] += rows_eq
                identical[name] += rows_eq and bool(np.array_equal(got[name].scores, got[first].scores))
                if rows_eq and got[name].rows.size:
                    worst[name] = max(worst[name], float(np.abs(got[name].scores - got[first].scores).max()))
    out = {}
    for name in engines:
        out[name] = summarise(stats[name])
        out[name]["identical_to_" + first] = identical[name] / len(stats[name])
        out[name]["same_rows_as_" + first] = same_rows[name] / len(stats[name])
        out[name]["max_score_diff_same_rows"] = worst[name]
        out[name]["cpu_ms"] = cpu_total[name] / len(stats[name]) * 1e3
        out[name]["cpu_outside_ort_share"] = 1.0 - cpu_inside[name] / cpu_total[name] if cpu_total[name] > 0 else float("nan")
        if steps is not None:
            out[name]["cpu_step_ms"] = cpu_step[name] / len(stats[name]) * 1e3
            out[name]["cpu_step_share"] = cpu_step[name] / cpu_total[name] if cpu_total[name] > 0 else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle with a graph")
    p.add_argument("--data", type=Path, required=True, help="the dataset the bundle was trained on (held-out users)")
    p.add_argument("--users", type=int, default=120, help="held-out (user, domain) queries")
    p.add_argument("--k", default="50,200,1000", help="comma-separated k values")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per query after one warm-up pass")
    p.add_argument("--loops", default="fused", help="search loops to compare, comma list of " + ", ".join(LOOPS))
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--step-time", action="store_true",
                   help="also time the fused loops' compiled calls alone (thread CPU; adds ~1 us a call)")
    args = p.parse_args()
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    # LOOP@huge: that loop on an engine with its per-row arrays in huge pages (MatchEngine(huge_pages=True)).
    if not loops or any(x.partition("@")[0] not in LOOPS or x.partition("@")[2] not in ("", "huge") for x in loops):
        p.error(f"--loops takes {', '.join(LOOPS)}, each optionally @huge, got {args.loops!r}")
    bundle = load_bundle(args.bundle)
    engines = {x: MatchEngine(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1, search_loop=x.partition("@")[0],
                              huge_pages=x.endswith("@huge")) for x in loops}
    q = held_out_queries(args.data, bundle, args.users, 0)
    queries = list(zip(q.features, q.domains, strict=True))
    for engine in engines.values():
        engine.warmup()
    steps = StepTimer() if args.step_time else None
    rows: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{len(queries)} queries x {args.repeats} passes, loops interleaved query by query")
    print("| k | loop | pairs/query | steps | mean ms | p50 ms | p99 ms | pair scorer | user encoder | "
          f"outside onnxruntime | of which gathers | CPU ms | outside onnxruntime (CPU time) | same rows as {loops[0]} | "
          "and same scores | max score difference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in (int(x) for x in args.k.split(",")):
        t0 = time.perf_counter()
        res = measure(engines, queries, k, args.repeats, steps)
        rows[str(k)] = res
        for name, r in res.items():
            print(f"| {k} | {name} | {r['pair_evaluations']:.0f} | {r['steps']:.1f} | {r['total_ms']:.2f} | "
                  f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['scorer_share']:.1%} | {r['user_encode_share']:.1%} | "
                  f"{r['outside_ort_share']:.1%} | {r['gather_share']:.1%} | {r['cpu_ms']:.2f} | "
                  f"{r['cpu_outside_ort_share']:.1%} | {r['same_rows_as_' + loops[0]]:.1%} | "
                  f"{r['identical_to_' + loops[0]]:.1%} | {r['max_score_diff_same_rows']:.1e} |"
                  + (f" step CPU {r['cpu_step_ms']:.2f} ms ({r['cpu_step_share']:.1%})" if steps is not None else ""))
        print(f"(k={k}: {time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "queries": len(queries), "repeats": args.repeats,
                                         "loops": loops, "k": rows}, indent=2))


if __name__ == "__main__":
    main()
