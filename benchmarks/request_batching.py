"""Concurrent requests merged into one scorer call (``BatchingScorer``) against one call per request.

The merge is designed for a GPU, where a call of a few hundred pairs leaves the device idle; this
script runs the same code path on whatever provider is given (CPU by default, ``--provider cuda`` on a
GPU host with onnxruntime-gpu), checks that every query gets exactly the answer it gets from the plain
engine, and reports throughput and how many expansion steps each merged call carried.

Usage::

    .venv/bin/python benchmarks/request_batching.py --bundle B --data D --users 200 --clients 1,8,32 \\
        [--provider cpu] [--intra-op-threads 2] [--json out.json]

The bundle must come from ``unimatch export`` with ``pair_scorer_batched.onnx`` (deep models).
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
from service.engine import MatchEngine
from service.scoring.batching import BatchingScorer
from service.scoring.host import CPU, CUDA


def run(engine: MatchEngine, work: list[tuple[Any, int]], k: int, clients: int) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        out = list(pool.map(lambda w: engine.match(w[0], int(w[1]), k, mode="graph").rows, work))
    return len(work) / (time.perf_counter() - t0), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--clients", default="1,8,32", help="concurrent client threads, comma list")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime threads per call (both engines)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    if "batched_scorer" not in bundle.manifest:
        raise SystemExit(f"{args.bundle}: no pair_scorer_batched.onnx in the manifest; re-export with `unimatch export`")
    providers = [CUDA, CPU] if args.provider == "cuda" else [CPU]
    plain = MatchEngine(bundle, providers=providers, intra_op_threads=args.intra_op_threads, batch_requests=False)
    merged = MatchEngine(bundle, providers=providers, intra_op_threads=args.intra_op_threads, batch_requests=True)
    scorer = merged.scorer
    if not isinstance(scorer, BatchingScorer):
        raise SystemExit("the batching engine did not get a BatchingScorer (see the log line above)")
    q = held_out_queries(args.data, bundle, args.users, 0)
    work = list(zip(q.features, q.domains, strict=True))
    plain.warmup()
    merged.warmup()
    rows: list[dict[str, Any]] = []
    print(f"provider {plain.provider}, {len(work)} queries, k={args.k}, {args.intra_op_threads} onnxruntime thread(s)")
    print("| clients | plain queries/s | merged queries/s | ratio | steps per merged call | identical answers (top-k overlap) |")
    print("|---|---|---|---|---|---|")
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            qps_plain, want = run(plain, work, args.k, clients)
            calls0, steps0 = scorer.calls, scorer.merged_steps
            qps_merged, got = run(merged, work, args.k, clients)
            per_call = (scorer.merged_steps - steps0) / max(scorer.calls - calls0, 1)
            # Same model, other batch shapes: float sums may differ in the last bits (multi-threaded GEMMs
            # block differently), which can swap near-ties at the k-th place; so overlap, not equality.
            same = sum(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
            overlap = float(np.mean([np.intersect1d(a, b).size / max(a.size, 1) for a, b in zip(want, got, strict=True)]))
            rows.append({"clients": clients, "qps_plain": qps_plain, "qps_merged": qps_merged,
                         "steps_per_merged_call": per_call, "identical_answers": same, "topk_overlap": overlap})
            print(f"| {clients} | {qps_plain:.1f} | {qps_merged:.1f} | {qps_merged / qps_plain:.2f} | {per_call:.2f} | "
                  f"{same}/{len(work)} ({overlap:.4f}) |")
    finally:
        scorer.close()
    if args.json is not None:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "provider": plain.provider, "k": args.k,
                                         "intra_op_threads": args.intra_op_threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
