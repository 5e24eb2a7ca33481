"""Synthetic generator: determinism, shapes, planted skew, and the leak-free time split."""

from pathlib import Path

import numpy as np
import pytest

from contracts.dataset import TEST, TRAIN, VALID, load_dataset, serving_sequences
from model.data.synth import generate, preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(preset("tiny", seed=3), tmp_path_factory.mktemp("d") / "tiny")


def test_generator_is_deterministic(tmp_path: Path, tiny: Path) -> None:
    other = generate(preset("tiny", seed=3), tmp_path / "again")
    a, b = load_dataset(tiny), load_dataset(other)
    for name in ("user", "entity", "domain", "timestamp", "split"):
        np.testing.assert_array_equal(getattr(a.interactions, name), getattr(b.interactions, name))
    np.testing.assert_array_equal(a.entities.cat, b.entities.cat)
    different = load_dataset(generate(preset("tiny", seed=4), tmp_path / "seed4"))
    assert not np.array_equal(a.interactions.entity, different.interactions.entity)


def test_sizes_and_entity_type_skew(tiny: Path) -> None:
    ds = load_dataset(tiny, verify_checksums=True)
    cfg = preset("tiny")
    assert len(ds.users) == cfg.num_users and len(ds.entities) == cfg.num_entities
    assert len(ds.interactions) == cfg.num_interactions
    types = np.bincount(ds.entities.entity_type, minlength=4)
    assert types.argmax() == 0 and types[0] > 0.9 * len(ds.entities) and types.min() > 0


def test_split_holds_out_latest_per_user_domain(tiny: Path) -> None:
    ds = load_dataset(tiny)
    it = ds.interactions
    assert {TRAIN, VALID, TEST} <= set(np.unique(it.split).tolist())
    key = it.user.astype(np.int64) * ds.schema.num_domains + it.domain
    for k in np.unique(key[it.split == TEST])[:50]:
        rows = key == k
        latest_train = it.timestamp[rows & (it.split == TRAIN)].max()
        assert it.timestamp[rows & (it.split == TEST)].min() >= latest_train
        assert it.timestamp[rows & (it.split == VALID)].min() >= latest_train


def test_serving_sequences_exclude_test(tiny: Path) -> None:
    ds = load_dataset(tiny)
    seq = serving_sequences(ds)
    assert seq.shape == (len(ds.users), ds.schema.max_seq_len)
    u = int(ds.interactions.user[0])
    rows = np.flatnonzero((ds.interactions.user == u) & (ds.interactions.split != TEST))
    expected = ds.interactions.entity[rows][-ds.schema.max_seq_len :]
    got = seq[u][seq[u] >= 0]
    np.testing.assert_array_equal(got, expected)
