"""`data describe`: exact counts on a hand-made dataset, the tables, the JSON file and the CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from contracts.dataset import TEST, TRAIN, VALID, Entities, Interactions, Users, write_dataset
from contracts.schema import CategoricalFeature, FeatureSchema, NumericFeature
from model.data.describe import describe_dataset, render
from unimatch.cli import main


@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    schema = FeatureSchema(
        domains=["feed", "search"],
        entity_types=["item", "live"],
        user_categorical=[CategoricalFeature(name="gender", cardinality=3)],
        entity_categorical=[CategoricalFeature(name="anchor", cardinality=4, applies_to=["live"])],
        entity_numeric=[NumericFeature(name="price")],
        max_seq_len=3,
    )
    # user 0: 5 rows in feed (3 train, 1 valid, 1 test); user 1: 2 in search (train, test); user 2: none
    inter = Interactions(
        user=np.array([0, 0, 0, 0, 0, 1, 1], np.int32),
        entity=np.array([0, 1, 2, 0, 3, 3, 1], np.int32),
        domain=np.array([0, 0, 0, 0, 0, 1, 1], np.int16),
        timestamp=np.arange(7, dtype=np.int64),
        split=np.array([TRAIN, TRAIN, TRAIN, VALID, TEST, TRAIN, TEST], np.int8),
    )
    return write_dataset(
        tmp_path / "hand",
        schema=schema,
        users=Users(np.array(["u0", "u1", "u2"]), np.array([[1], [0], [2]], np.int32), np.zeros((3, 0), np.float32)),
        entities=Entities(
            np.array(["i0", "i1", "i2", "l0"]),
            np.array([0, 0, 0, 1], np.int16),
            np.array([[0], [0], [0], [2]], np.int32),
            np.array([[1.0], [2.0], [3.0], [4.0]], np.float32),
            np.array([0b11, 0b01, 0b11, 0b11], np.uint64),
        ),
        interactions=inter,
        meta={"source": "handmade", "time": "row order"},
    )


def test_counts_per_domain_and_type(handmade: Path) -> None:
    d = describe_dataset(handmade)
    assert d["counts"] == {
        "users": 3,
        "entities": 4,
        "interactions": 7,
        "domains": 2,
        "entity_types": 2,
        "interactions_by_split": {"train": 4, "validation": 1, "test": 2},
    }
    feed, search = d["domains"]["feed"], d["domains"]["search"]
    assert feed["interactions"] == {"train": 3, "validation": 1, "test": 1}
    assert search["interactions"] == {"train": 1, "validation": 0, "test": 1}
    assert (feed["users"], feed["eligible_entities"], feed["entities_interacted"]) == (1, 4, 4)
    assert (search["users"], search["eligible_entities"], search["entities_interacted"]) == (1, 3, 2)
    # sparsity counts distinct (user, entity) pairs: u0 repeats i0 in feed, which fills no new cell
    assert feed["distinct_user_entity_pairs"] == 4 and feed["sparsity"] == pytest.approx(0.0)
    assert search["sparsity"] == pytest.approx(1 - 2 / 3)
    assert d["sparsity"] == pytest.approx(1 - 6 / 12)
    item, live = d["entity_types"]["item"], d["entity_types"]["live"]
    assert item["entities"] == 3 and live["entities"] == 1 and live["share_of_entities"] == 0.25
    assert item["interactions"] == {"train": 3, "validation": 1, "test": 1}
    assert live["interactions"] == {"train": 1, "validation": 0, "test": 1}
    assert item["eligible_per_domain"] == {"feed": 3, "search": 2} and live["eligible_per_domain"] == {
        "feed": 1,
        "search": 1,
    }
    assert d["notes"] == {"time": "row order"} and d["source"] == "handmade"


def test_sequence_lengths_and_features(handmade: Path) -> None:
    d = describe_dataset(handmade)
    sl = d["sequence_lengths"]
    assert sl["max_seq_len"] == 3 and sl["users_without_history"] == 1
    assert sl["interactions_per_user"]["p100"] == 5 and sl["interactions_per_user"]["p0"] == 0
    assert sl["history_before_test_per_user"]["mean"] == pytest.approx((4 + 1 + 0) / 3)
    # serving sequences are capped at max_seq_len: 3, 1, 0
    assert sl["serving_sequence_length"]["p100"] == 3 and sl["serving_sequence_length"]["mean"] == pytest.approx(4 / 3)
    feats = {f["name"]: f for f in d["features"]}
    assert feats["gender"]["cardinality"] == 3 and feats["gender"]["missing_share"] == pytest.approx(1 / 3)
    # the type-specific column is judged on live entities only
    assert feats["anchor"]["applies_to"] == ["live"] and feats["anchor"]["missing_share"] == 0.0
    assert feats["price"]["mean"] == pytest.approx(2.5)


def test_render_prints_every_table(handmade: Path) -> None:
    con = Console(record=True, width=160)
    render(describe_dataset(handmade), con)
    text = con.export_text()
    for title in ("per domain", "per entity type", "sequence lengths", "feature columns"):
        assert title in text
    assert "search" in text and "anchor" in text and "serving sequence" in text


def test_cli_json_and_errors(handmade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d" / "summary.json"
    assert main(["data", "describe", str(handmade), "--json", str(out)]) == 0
    assert "per domain" in capsys.readouterr().out
    assert json.loads(out.read_text())["domains"]["feed"]["users"] == 1
    assert main(["data", "describe", str(tmp_path / "missing")]) == 2
    assert "not a dataset directory" in capsys.readouterr().err


def test_split_report_counts_queries_and_warns_on_small_test_sets() -> None:
    from contracts.dataset import TEST, TRAIN, VALID
    from model.data.split import leave_last_out, split_report

    # domain a: 300 users with 3 interactions each (one test query each, no warning);
    # domain b: 500 click-log users with 2 each, too short for leave-last-out (0 test queries);
    # domain c: 20,000 users, of whom 150 have a held-out interaction (over 100, under 1%)
    ua = np.repeat(np.arange(300), 3)
    ub = np.repeat(np.arange(500), 2)
    uc = np.r_[np.repeat(np.arange(150), 3), np.arange(150, 20_000)]
    user = np.r_[ua, ub, uc]
    domain = np.r_[np.zeros(ua.size), np.ones(ub.size), np.full(uc.size, 2)].astype(np.int64)
    split = leave_last_out(user, domain, np.arange(user.size), num_domains=3)
    rep = split_report(user, domain, split, domains=["a", "b", "c"], num_users=20_000)
    a = rep["domains"]["a"]
    assert a["interactions"] == {"train": 300, "validation": 300, "test": 300}
    assert a["queries"] == {"train": 300, "validation": 300, "test": 300} and a["users"] == 300
    assert rep["domains"]["b"]["queries"]["test"] == 0 and rep["domains"]["c"]["queries"]["test"] == 150
    assert len(rep["warnings"]) == 2
    wb, wc = rep["warnings"]
    assert wb.startswith("domain 'b': 0 test queries (0.0% of its 500 users)") and "lower the split's min_train" in wb
    assert "under 1% of its users" in wc and "under 100 queries" not in wc
    assert int((split == TEST).sum()) + int((split == VALID).sum()) + int((split == TRAIN).sum()) == user.size
