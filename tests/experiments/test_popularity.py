"""The popularity yardstick against a brute-force loop over users, on the tiny synthetic preset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from experiments.popularity import main, popularity_recall


def test_matches_brute_force(tmp_path: Path) -> None:
    from model.data.dataset import TEST, TRAIN, load_dataset
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
