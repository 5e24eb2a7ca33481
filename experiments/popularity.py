"""A model-free yardstick for the tables: Recall-all@N of "the N most popular entities of the domain".

Every user of domain k gets the same list, the entities eligible in k ranked by their train-split
interaction count in k. It is measured exactly like ``unimatch eval`` measures a model (Eq. 26:
per test user, |G_u ∩ A_u| / |G_u|, mean over users per domain, then mean over domains), so a
method close to it has learnt little beyond popularity. Usage::

    python -m experiments.popularity --data DIR --n 10,20,50,100,200,500 [--users 1000 --seed 0]

``--users`` / ``--seed`` draw the test users exactly as ``unimatch eval --users --seed`` (and the
experiment runner's ``eval.max_users`` with the run's seed) do, so the yardstick can be measured on
the very users a table's runs of that seed were scored on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def popularity_recall(
    data: Path, ns: list[int], *, max_users: int | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{"<domain>" | "average": {"<N>": recall}}`` of the per-domain popularity ranking on the test split.

    ``max_users``: score only that many test users, drawn as ``model.evaluate`` draws them
    (``numpy.random.default_rng(seed).choice`` over the sorted distinct test users, without
    replacement); ``None`` = every test user.
    """
    from contracts.dataset import TEST, load_dataset
    from model.evaluate import average_over_domains, sample_users
    from model.evaluate import popularity_recall as _popularity

    if not ns or min(ns) < 1:
        raise ValueError(f"N values must be >= 1, got {ns}")
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1, got {max_users}")
    ds = load_dataset(data)
    # The same draw as model.evaluate.evaluate, so the same users for the same seed.
    users = sample_users(ds, TEST, max_users if max_users is not None else len(ds.users), seed)
    per_domain, _, _ = _popularity(ds, users, tuple(ns))
    if not per_domain:
        raise ValueError(f"{data}: no test interactions")
    return {**per_domain, "average": average_over_domains(per_domain, tuple(ns))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="dataset directory")
    p.add_argument("--n", default="10,20,50,100,200,500", help="comma-separated N values")
    p.add_argument(
        "--users", type=int, default=None, help="score this many sampled test users (as `unimatch eval --users`)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the user sample (as `unimatch eval --seed`)")
    args = p.parse_args(argv)
    try:
        ns = [int(v) for v in args.n.split(",") if v.strip()]
        print(json.dumps(popularity_recall(args.data, ns, max_users=args.users, seed=args.seed), indent=2))
    except ValueError as exc:
        print(f"popularity: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
