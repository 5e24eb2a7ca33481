"""The request path's pieces apart from HTTP: the vocabulary, the overrides, one validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.dataset import PAD
from contracts.features import UserFeatures
from service.engine import MatchEngine, SearchError
from service.errors import InvalidRequest
from service.overrides import apply_overrides
from service.schemas import FeatureOverrides
from service.vocabulary import Vocabulary, rows_of


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path):
    return load_bundle(bundle_dir)


def test_vocabulary_matches_the_schema(bundle) -> None:
    v = Vocabulary.of(bundle)
    schema = bundle.schema
    assert [v.domains[d] for d in schema.domains] == list(range(len(schema.domains)))
    assert v.type_names == tuple(schema.entity_types)
    for i, c in enumerate(schema.user_categorical):
        assert v.categorical[c.name] == (i, c.cardinality)
    assert v.max_seq_len == schema.max_seq_len


def test_rows_of_counts_unknown_ids(bundle) -> None:
    ids = [str(bundle.entity_ids[5]), "no-such-entity", str(bundle.entity_ids[2])]
    rows, unknown = rows_of(bundle.row_of, ids)
    assert rows.tolist() == [5, 2] and rows.dtype == np.int64 and unknown == 1


def test_overrides_replace_features_and_append_recent(bundle) -> None:
    v = Vocabulary.of(bundle)
    schema = bundle.schema
    L = schema.max_seq_len
    base = UserFeatures.cold_start(schema)
    base = UserFeatures(cat=base.cat, num=base.num, seq=np.concatenate([np.full(L - 2, PAD), [7, 8]]).astype(np.int64))
    cat_name, num_name = schema.user_categorical[0].name, schema.user_numeric[-1].name
    over = FeatureOverrides(categorical={cat_name: 1}, numeric={num_name: 2.5},
                            recent=[str(bundle.entity_ids[3]), "gone"])
    got, unknown = apply_overrides(base, over, v, bundle)
    assert got.cat[0] == 1 and got.num[-1] == np.float32(2.5) and unknown == 1
    assert got.seq[-3:].tolist() == [7, 8, 3] and (got.seq[:-3] == PAD).all()
    assert base.seq[-1] == 8 and base.cat[0] == schema.user_categorical[0].default  # the stored value is untouched
    # a full sequence replaces the history; only the latest L survive
    long = [str(bundle.entity_ids[i % 10]) for i in range(L + 5)]
    got, _ = apply_overrides(base, FeatureOverrides(sequence=long), v, bundle)
    assert got.seq.tolist() == [i % 10 for i in range(5, L + 5)]
    assert apply_overrides(base, None, v, bundle) == (base, 0)


def test_bad_overrides_are_bad_requests(bundle) -> None:
    v = Vocabulary.of(bundle)
    base = UserFeatures.cold_start(bundle.schema)
    col = bundle.schema.user_categorical[0]
    with pytest.raises(InvalidRequest, match="unknown categorical feature 'nope'"):
        apply_overrides(base, FeatureOverrides(categorical={"nope": 1}), v, bundle)
    with pytest.raises(InvalidRequest, match=rf"code {col.cardinality} outside \[0, {col.cardinality}\)"):
        apply_overrides(base, FeatureOverrides(categorical={col.name: col.cardinality}), v, bundle)
    with pytest.raises(InvalidRequest, match="must be finite"):
        apply_overrides(base, FeatureOverrides(numeric={bundle.schema.user_numeric[0].name: float("inf")}), v, bundle)


def test_query_validates_once_and_run_answers_it(bundle) -> None:
    engine = MatchEngine(bundle)
    user = UserFeatures.cold_start(bundle.schema)
    q = engine.query(user, 1, 9, exclude_rows=np.array([4, 4, 2]), entity_types=[0])
    assert q.exclude_rows.tolist() == [2, 4] and q.entity_types.tolist() == [0]
    assert q.eligible == engine.eligible_count(1, [0])
    a, b = engine.run(q), engine.match(user, 1, 9, exclude_rows=np.array([2, 4]), entity_types=[0])
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.scores, b.scores)
    assert not set(a.rows.tolist()) & {2, 4} and a.stats.eligible == q.eligible
    with pytest.raises(SearchError, match="exceeds the"):
        engine.query(user, 1, engine.eligible_count(1) + 1)
