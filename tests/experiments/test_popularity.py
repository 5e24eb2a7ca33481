"""The popularity yardstick against a brute-force loop over users, on the tiny synthetic preset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from experiments.popularity import main, popularity_recall


def test_matches_brute_force(tmp_path: Path) -> None:
    from contracts.dataset import TEST, TRAIN, load_dataset
    from model.data.synth import generate, preset

    ds = load_dataset(generate(preset("tiny"), tmp_path / "d"))
    got = popularity_recall(ds.root, [1, 10, 100])
    inter = ds.interactions
    split, user, ent, dom = (np.asarray(a) for a in (inter.split, inter.user, inter.entity, inter.domain))
    for k, name in enumerate(ds.schema.domains):
        eligible = [int(e) for e in np.flatnonzero(ds.entities.in_domain(k))]
        counts = Counter(int(e) for e in ent[(split == TRAIN) & (dom == k)])
        ranked = sorted(eligible, key=lambda e: -counts.get(e, 0))  # stable: ties in entity order
        truth: dict[int, set[int]] = {}
        for u, e in zip(user[(split == TEST) & (dom == k)], ent[(split == TEST) & (dom == k)], strict=True):
            truth.setdefault(int(u), set()).add(int(e))
        for n in (1, 10, 100):
            top = set(ranked[:n])
            want = np.mean([len(g & top) / len(g) for g in truth.values()])
            assert got[name][str(n)] == pytest.approx(want)
    assert got["average"]["100"] >= got["average"]["10"] >= got["average"]["1"]


def test_bad_input(tmp_path: Path) -> None:
    assert main(["--data", str(tmp_path / "none")]) == 2
    with pytest.raises(ValueError):
        popularity_recall(tmp_path, [0])


def test_user_sample_matches_brute_force(tmp_path: Path) -> None:
    """--users/--seed score only the users model.evaluate would draw for that seed."""
    from contracts.dataset import TEST, TRAIN, load_dataset
    from model.data.synth import generate, preset

    ds = load_dataset(generate(preset("tiny"), tmp_path / "d"))
    inter = ds.interactions
    split, user, ent, dom = (np.asarray(a) for a in (inter.split, inter.user, inter.entity, inter.domain))
    all_users = np.unique(user[split == TEST].astype(np.int64))
    assert all_users.size > 5
    # Every user, or more than there are: the same as no sample at all.
    full = popularity_recall(ds.root, [1, 10, 100])
    assert popularity_recall(ds.root, [1, 10, 100], max_users=all_users.size, seed=3) == full
    size = all_users.size // 2
    for seed in (0, 1):
        got = popularity_recall(ds.root, [1, 10, 100], max_users=size, seed=seed)
        # model.evaluate's draw, written out again
        chosen = set(np.random.default_rng(seed).choice(all_users, size=size, replace=False).tolist())
        for k, name in enumerate(ds.schema.domains):
            eligible = [int(e) for e in np.flatnonzero(ds.entities.in_domain(k))]
            counts = Counter(int(e) for e in ent[(split == TRAIN) & (dom == k)])
            ranked = sorted(eligible, key=lambda e: -counts.get(e, 0))
            truth: dict[int, set[int]] = {}
            for u, e in zip(user[(split == TEST) & (dom == k)], ent[(split == TEST) & (dom == k)], strict=True):
                if int(u) in chosen:
                    truth.setdefault(int(u), set()).add(int(e))
            if not truth:
                assert name not in got
                continue
            for n in (1, 10, 100):
                top = set(ranked[:n])
                want = np.mean([len(g & top) / len(g) for g in truth.values()])
                assert got[name][str(n)] == pytest.approx(want)
    with pytest.raises(ValueError):
        popularity_recall(ds.root, [10], max_users=0)
