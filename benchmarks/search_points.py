"""Coverage@k against share scored for hand-picked search operating points, exhaustive top-k cached.

`unimatch bench search` sweeps a fixed grid; this script answers "what does *this* setting give?"
in seconds once the exhaustive reference of the sample is cached (a 1M-entity exhaustive pass costs
seconds per query, so it is computed once, with 2 onnxruntime threads, and saved next to the bundle).

Each point is a JSON object with the ``SearchParams`` fields to override, e.g.::

    .venv/bin/python benchmarks/search_points.py --bundle B --data D --users 40 --k 200 \\
        '{"whole_top_layer_up_to": 0}' '{}' '{"max_degree": [0, 0, 0, 16]}'

(``{}`` is the engine's default point.)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from contracts.bundle import load_bundle
from service.bench.search_bench import held_out_queries
from service.engine import MatchEngine, SearchParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("points", nargs="+", help="JSON objects of SearchParams overrides ('{}' = defaults)")
    args = p.parse_args()
    points = []
    for text in args.points:  # all points checked before the (slow) exhaustive reference is computed
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            overrides = {key: tuple(v) if isinstance(v, list) else v for key, v in raw.items()}
            points.append((text, replace(SearchParams(), **overrides)))
        except (ValueError, TypeError) as exc:  # bad JSON, unknown field, SearchError (a ValueError)
            p.error(f"point {text!r}: {exc}")
    bundle = load_bundle(args.bundle)
    q = held_out_queries(args.data, bundle, args.users, 0)
    cache = args.bundle.parent / f"exhaustive-top{args.k}-{args.bundle.name}-{args.users}.npy"
    if cache.exists():
        exact = np.load(cache)
    else:
        ref = MatchEngine(bundle, providers=["CPUExecutionProvider"], intra_op_threads=2)
        t0 = time.perf_counter()
        exact = np.stack([ref.match(u, int(d), args.k, mode="exhaustive").rows[: args.k] for u, d in zip(q.features, q.domains, strict=True)])
        np.save(cache, exact)
        print(f"exhaustive reference: {len(exact)} queries in {time.perf_counter() - t0:.0f} s -> {cache}")
    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    engine.warmup()
    print("| point | coverage@k (min) | scored | pairs | mean ms |")
    print("|---|---|---|---|---|")
    for text, params in points:
        cov, pairs, ms = [], [], []
        for i, (u, d) in enumerate(zip(q.features, q.domains, strict=True)):
            r = engine.match(u, int(d), args.k, mode="graph", params=params)
            cov.append(len(np.intersect1d(r.rows, exact[i])) / args.k)
            pairs.append(r.stats.pair_evaluations)
            ms.append(r.stats.total_ms)
        print(f"| `{text}` | {np.mean(cov):.4f} ({np.min(cov):.3f}) | {np.mean(pairs) / bundle.num_entities:.2%} | "
              f"{np.mean(pairs):.0f} | {np.mean(ms):.1f} |")


if __name__ == "__main__":
    main()
