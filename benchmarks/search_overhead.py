"""Where a graph query's time goes: pair scorer, user encoder, and everything outside onnxruntime.

The target bounds the work outside the scorer's onnxruntime calls (gathers, visited set, top-n, Python)
at 20% of the query time: beyond it the search code, not the model, would set the latency. `unimatch bench search` reports the same split, but only after an exhaustive
pass over every query (seconds per query at 1M); this script runs the graph searches alone, so the
split can be re-measured in a minute after a change to the search code. No coverage numbers here.

Usage::

    .venv/bin/python benchmarks/search_overhead.py --bundle B --data D --users 120 --k 50,200,1000 \\
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from contracts.bundle import load_bundle
from service.bench.search_bench import held_out_queries
from service.engine import MatchEngine

KEYS = ("total_ms", "scorer_ms", "user_encode_ms", "gather_ms", "pair_evaluations", "steps", "scorer_calls")


def measure(engine: MatchEngine, queries: list, k: int, repeats: int) -> dict[str, float]:
    """Mean per-query stats over ``repeats`` passes (the first pass of each query warms the caches)."""
    sums = dict.fromkeys(KEYS, 0.0)
    n = 0
    for u, d in queries:
        engine.match(u, int(d), k, mode="graph")  # warm: page in this query's graph region and tables
        for _ in range(repeats):
            r = engine.match(u, int(d), k, mode="graph")
            for key in KEYS:
                sums[key] += getattr(r.stats, key)
            n += 1
    out = {key: v / n for key, v in sums.items()}
    total = sums["total_ms"]
    out["scorer_share"] = sums["scorer_ms"] / total
    out["user_encode_share"] = sums["user_encode_ms"] / total
    out["outside_ort_share"] = (total - sums["scorer_ms"] - sums["user_encode_ms"]) / total
    out["gather_share"] = sums["gather_ms"] / total
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle with a graph")
    p.add_argument("--data", type=Path, required=True, help="the dataset the bundle was trained on (held-out users)")
    p.add_argument("--users", type=int, default=120, help="held-out (user, domain) queries")
    p.add_argument("--k", default="50,200,1000", help="comma-separated k values")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per query after one warm-up pass")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    q = held_out_queries(args.data, bundle, args.users, 0)
    queries = list(zip(q.features, q.domains, strict=True))
    engine.warmup()
    rows = {}
    print("| k | pairs/query | steps | p-mean ms | pair scorer | user encoder | outside onnxruntime | of which gathers |")
    print("|---|---|---|---|---|---|---|---|")
    for k in (int(x) for x in args.k.split(",")):
        t0 = time.perf_counter()
        r = measure(engine, queries, k, args.repeats)
        rows[str(k)] = r
        print(f"| {k} | {r['pair_evaluations']:.0f} | {r['steps']:.1f} | {r['total_ms']:.2f} | {r['scorer_share']:.1%} | "
              f"{r['user_encode_share']:.1%} | {r['outside_ort_share']:.1%} | {r['gather_share']:.1%} |  "
              f"({time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "queries": len(queries), "k": rows}, indent=2))


if __name__ == "__main__":
    main()
