"""Batched lockstep search (``MatchEngine.match_many``) against thread-per-request search, as served.

The service answers each request on a worker thread (``engine.match``; on a CPU host one scorer call
per request and step, `make_scorer` turns request merging off). The lockstep search takes B requests
at once and advances their beams together: one scorer call per step for all of them, either B
per-request onnxruntime calls ("lockstep") or ONE call of ``pair_scorer_batched.onnx`` with every
request's rows ("lockstep, merged"). This script runs the same held-out queries through each, with the
same number of worker threads (each lockstep worker takes batches of B), interleaved in rounds, and
reports queries/s, queries/s per worker thread, latency of a query (a lockstep query waits for its
batch), and how many answers are identical to thread-per-request's.

Usage::

    .venv/bin/python benchmarks/lockstep.py --bundle B --data D --users 200 --k 200 --threads 1,2 \\
        --batch 8,32 [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import load_bundle
from service.bench.search_bench import held_out_queries
from service.engine import EngineRequest, MatchEngine, MatchResult


def thread_per_request(engine: MatchEngine, reqs: list[EngineRequest], threads: int) -> tuple[float, list[MatchResult]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        out = list(pool.map(lambda r: engine.match(r.user, r.domain, r.k, mode="graph"), reqs))
    return time.perf_counter() - t0, out


def lockstep(engine: MatchEngine, reqs: list[EngineRequest], threads: int, batch: int, merged: bool) -> tuple[float, list[MatchResult]]:
    chunks = [reqs[i : i + batch] for i in range(0, len(reqs), batch)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(lambda c: engine.match_many(c, merged=merged), chunks))
    return time.perf_counter() - t0, [r for part in parts for r in part]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle with a graph")
    p.add_argument("--data", type=Path, required=True, help="the dataset the bundle was trained on (held-out users)")
    p.add_argument("--users", type=int, default=200, help="held-out (user, domain) queries")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--threads", default="1,2", help="worker threads, comma list (each runs one request or one batch)")
    p.add_argument("--batch", default="8,32", help="lockstep batch sizes B, comma list")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the table reports the best of each")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    engine.warmup()
    q = held_out_queries(args.data, bundle, args.users, 0)
    reqs = [EngineRequest(user=u, domain=int(d), k=args.k, mode="graph") for u, d in zip(q.features, q.domains, strict=True)]
    merged_ok = engine.scorer.batched_session() is not None
    if not merged_ok:
        print(f"{args.bundle}: no pair_scorer_batched.onnx; the merged lockstep column is skipped")
    thread_list = [int(x) for x in args.threads.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    variants: list[tuple[str, int, int, bool]] = []
    for t in thread_list:
        variants.append(("thread per request", t, 1, False))
        for b in batches:
            variants.append(("lockstep", t, b, False))
            if merged_ok:
                variants.append(("lockstep, merged", t, b, True))
    _, want = thread_per_request(engine, reqs, 1)  # the reference answers (and a warm pass)
    best: dict[tuple[str, int, int, bool], dict[str, Any]] = {}
    for _ in range(args.rounds):
        for v in variants:
            name, t, b, merged = v
            secs, got = thread_per_request(engine, reqs, t) if name == "thread per request" else lockstep(engine, reqs, t, b, merged)
            lat = np.array([r.stats.total_ms for r in got])
            same = sum(np.array_equal(a.rows, g.rows) and np.array_equal(a.scores, g.scores) for a, g in zip(want, got, strict=True))
            same_rows = sum(np.array_equal(a.rows, g.rows) for a, g in zip(want, got, strict=True))
            row = {"mode": name, "threads": t, "batch": b, "qps": len(reqs) / secs, "qps_per_thread": len(reqs) / secs / t,
                   "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                   "pairs": float(np.mean([r.stats.pair_evaluations for r in got])),
                   "identical": int(same), "identical_rows": int(same_rows)}
            if v not in best or row["qps"] > best[v]["qps"]:
                best[v] = row
    print(f"{len(reqs)} queries, k={args.k}, CPU, 1 onnxruntime thread per call, best of {args.rounds} interleaved rounds")
    print("| search | worker threads | batch B | queries/s | queries/s per thread | ratio to thread per request | "
          "query p50 / p99 ms | pairs/query | identical rows+scores (rows) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        r = best[v]
        base = best[("thread per request", r["threads"], 1, False)]["qps"]
        print(f"| {r['mode']} | {r['threads']} | {r['batch'] if r['mode'] != 'thread per request' else '-'} | {r['qps']:.1f} | "
              f"{r['qps_per_thread']:.1f} | {r['qps'] / base:.2f} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['pairs']:.0f} | "
              f"{r['identical']}/{len(reqs)} ({r['identical_rows']}) |")
    if args.json is not None:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "k": args.k, "queries": len(reqs),
                                         "rows": list(best.values())}, indent=2))


if __name__ == "__main__":
    main()
