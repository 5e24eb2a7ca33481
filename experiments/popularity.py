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

import numpy as np


def popularity_recall(
    data: Path, ns: list[int], *, max_users: int | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{"<domain>" | "average": {"<N>": recall}}`` of the per-domain popularity ranking on the test split.

    ``max_users``: score only that many test users, drawn as ``model.evaluate`` draws them
    (``numpy.random.default_rng(seed).choice`` over the sorted distinct test users, without
    replacement); ``None`` = every test user.
    """
    from model.data.dataset import TEST, TRAIN, load_dataset

    if not ns or min(ns) < 1:
        raise ValueError(f"N values must be >= 1, got {ns}")
    ds = load_dataset(data)
    inter = ds.interactions
    split = np.asarray(inter.split)
    user, entity, domain = np.asarray(inter.user), np.asarray(inter.entity), np.asarray(inter.domain)
    is_test = split == TEST
    if max_users is not None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        test_users = np.unique(user[is_test].astype(np.int64))
        if test_users.size > max_users:
            # The same draw as model.evaluate.evaluate, so the same users for the same seed.
            chosen = np.sort(np.random.default_rng(seed).choice(test_users, size=max_users, replace=False))
            is_test &= np.isin(user, chosen)
    per_domain: dict[str, dict[str, float]] = {}
    for k, name in enumerate(ds.schema.domains):
        test = is_test & (domain == k)
        if not test.any():
            continue
        eligible = np.flatnonzero(ds.entities.in_domain(k))
        counts = np.bincount(entity[(split == TRAIN) & (domain == k)], minlength=len(ds.entities))[eligible]
        # Stable sort: ties keep entity order, so the list is deterministic.
        ranked = eligible[np.argsort(-counts, kind="stable")]
        rank_of = np.full(len(ds.entities), np.iinfo(np.int64).max, dtype=np.int64)
        rank_of[ranked] = np.arange(ranked.size)
        # G_u is a set (as in model.evaluate): a test entity repeated for one user counts once.
        pairs = np.unique(user[test].astype(np.int64) * len(ds.entities) + entity[test])
        users, ents = pairs // len(ds.entities), pairs % len(ds.entities)
        ranks = rank_of[ents]
        per_domain[name] = {}
        for n in ns:
            hit = (ranks < n).astype(np.float64)
            # Per user: hits / |G_u|, then the mean over users (as model.evaluate does).
            uniq, inv = np.unique(users, return_inverse=True)
            per_user = np.bincount(inv, weights=hit) / np.bincount(inv)
            per_domain[name][str(n)] = float(per_user.mean()) if uniq.size else 0.0
    if not per_domain:
        raise ValueError(f"{data}: no test interactions")
    average = {str(n): float(np.mean([per_domain[d][str(n)] for d in per_domain])) for n in ns}
    return {**per_domain, "average": average}


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
