"""Rows per onnxruntime call in exhaustive mode: thread CPU time per pair at each chunk size.

Exhaustive mode (small catalogues, the calibration's reference, the shadow monitor) scores a whole
domain in chunks. This measures the pair scorer's cost per pair at several chunk sizes on one bundle,
interleaved (every size once per round, ``--rounds`` rounds), on the calling thread with one intra-op
thread: thread CPU time, so other jobs on the machine move it less than wall time. It chose
``service.engine.EXHAUSTIVE_CHUNK_CPU``.

    python -m benchmarks.exhaustive_chunk --bundle B --data D [--rows 65536] [--rounds 3] [--md out.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from contracts.bundle import load_bundle
from service.bench.search_bench import held_out_queries
from service.scoring.host import HostGatherScorer

SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="an exported bundle")
    p.add_argument("--data", type=Path, required=True, help="its dataset (one held-out user is the query)")
    p.add_argument("--rows", type=int, default=65536, help="rows scored per chunk size and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every size (interleaved)")
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    scorer = HostGatherScorer(bundle, max_batch=max(SIZES))
    q = held_out_queries(args.data, bundle, 1, 0)
    u = q.features[0]
    ctx = scorer.encode(u.cat, u.num, u.seq, int(q.domains[0]))
    n = min(bundle.num_entities, args.rows)
    rows = np.random.default_rng(0).permutation(bundle.num_entities)[:n].astype(np.int64)
    scorer.score(ctx, rows[:4096])  # warm
    cpu: dict[int, list[float]] = {s: [] for s in SIZES}
    wall: dict[int, list[float]] = {s: [] for s in SIZES}
    loads = []
    for _ in range(args.rounds):
        for size in SIZES:
            t, w = time.thread_time(), time.perf_counter()
            for i in range(0, n, size):
                scorer.score(ctx, rows[i : i + size])
            cpu[size].append((time.thread_time() - t) / n * 1e6)
            wall[size].append((time.perf_counter() - w) / n * 1e6)
        loads.append(os.getloadavg()[0])
    lines = [f"{args.bundle}: {n:,} rows per size and round, {args.rounds} rounds, load average "
             f"{min(loads):.1f}-{max(loads):.1f}", "",
             "| rows per call | CPU us/pair (median) | min | wall us/pair (median) |", "|---|---|---|---|"]
    for size in SIZES:
        lines.append(f"| {size:,} | {np.median(cpu[size]):.2f} | {min(cpu[size]):.2f} | {np.median(wall[size]):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:  # a bad bundle or dataset (BundleError, BenchError): one line
        print(f"{Path(__file__).stem}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
