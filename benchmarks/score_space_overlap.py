"""Do the probe users of a score-space graph flatter the benchmark? Coverage of test queries by overlap.

`unimatch index score-space` draws its probe (user, domain) pairs from the training split; the split is
by interaction, so a probe user usually has test interactions too, and its test query is then served
by a graph that holds that user's own scores. This measures coverage@k and pairs per query of the
engine as served (calibrated) on the test queries of `unimatch bench search` (same sample: --users,
--seed), split into: same (user, domain) as a probe, same user only, not a probe user.

    python -m benchmarks.score_space_overlap --bundle B --data D [--users 300] [--k 200] [--probe-users 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from contracts.bundle import load_bundle
from service.bench.search_bench import held_out_queries
from service.engine import MatchEngine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="a bundle built with --space scores")
    p.add_argument("--data", type=Path, required=True, help="its dataset")
    p.add_argument("--users", type=int, default=300, help="test queries (as `unimatch bench search --users`)")
    p.add_argument("--seed", type=int, default=0, help="their seed (as `unimatch bench search --seed`)")
    p.add_argument("--k", type=int, default=200)
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    space = bundle.manifest.get("graph_space")
    if not space:
        raise ValueError(f"{args.bundle}: no graph_space in its manifest (build it with --space scores)")
    probe = held_out_queries(args.data, bundle, int(space["probe_users"]), int(space["seed"]), split="train", per_domain=True)
    pairs_set = set(zip(probe.user_rows.tolist(), probe.domains.tolist(), strict=True))
    users_set = set(probe.user_rows.tolist())
    q = held_out_queries(args.data, bundle, args.users, args.seed)
    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"])
    groups: dict[str, list[tuple[float, int]]] = {"same user and domain": [], "same user": [], "not a probe user": []}
    for u, d, f in zip(q.user_rows.tolist(), q.domains.tolist(), q.features, strict=True):
        got = engine.match(f, d, args.k)
        exact = engine.match(f, d, args.k, mode="exhaustive")
        cov = np.intersect1d(got.rows, exact.rows).size / args.k
        key = "same user and domain" if (u, d) in pairs_set else ("same user" if u in users_set else "not a probe user")
        groups[key].append((cov, got.stats.pair_evaluations))
    print(f"{args.bundle}: {len(q.features)} test queries, {len(probe.features)} probe pairs, k={args.k}\n")
    print("| test queries | count | coverage@k | pairs/query |\n|---|---|---|---|")
    for key, rows in groups.items():
        if rows:
            a = np.array(rows, dtype=np.float64)
            print(f"| {key} | {len(rows)} | {a[:, 0].mean():.4f} | {a[:, 1].mean():.0f} |")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:  # a bad bundle or dataset (BundleError, BenchError): one line
        print(f"{Path(__file__).stem}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
