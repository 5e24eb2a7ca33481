"""`unimatch eval --baseline popularity` and the Recall-all figures eval prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contracts.dataset import TEST, TRAIN, load_dataset
from model.data.synth import SynthConfig, generate
from model.evaluate import popularity_recall, sample_users
from unimatch.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(SynthConfig(num_users=80, num_entities=200, num_interactions=2500, max_seq_len=8),
                    tmp_path_factory.mktemp("d") / "tiny")  # fmt: skip


def test_popularity_baseline_by_hand(data: Path) -> None:
    ds = load_dataset(data)
    users = sample_users(ds, TEST, 1000, 0)
    per_domain, counts, micro = popularity_recall(ds, users, (1, 10))
    it = ds.interactions
    split, user, ent, dom = (np.asarray(x) for x in (it.split, it.user, it.entity, it.domain))
    per_query: list[float] = []
    for k, name in enumerate(ds.schema.domains):
        eligible = np.flatnonzero(ds.entities.in_domain(k))
        pop = {int(e): int(((split == TRAIN) & (dom == k) & (ent == e)).sum()) for e in eligible}
        top10 = sorted(pop, key=lambda e: (-pop[e], e))[:10]  # ties in entity order
        recalls = []
        for u in np.unique(user[(split == TEST) & (dom == k)]):
            g = set(ent[(split == TEST) & (dom == k) & (user == u)].tolist())
            recalls.append(len(g & set(top10)) / len(g))
        per_query += recalls
        assert per_domain[name]["10"] == pytest.approx(np.mean(recalls)) and counts[name] == len(recalls)
    assert micro["10"] == pytest.approx(np.mean(per_query))


def test_cli_baseline_writes_contract_json(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.popularity import popularity_recall as experiments_popularity

    out = tmp_path / "pop.json"
    assert main(["eval", "--baseline", "popularity", "--data", str(data), "--n", "5,20", "--json", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "baseline:popularity" and set(res["recall_all"]["average"]) == {"5", "20"}
    assert res["recall_all"] == experiments_popularity(data, [5, 20], max_users=2000)
    text = capsys.readouterr().out
    assert "average over domains" in text and "Per-query mean (JSON `recall_all_micro`" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "popularity"], "--baseline needs --data DIR"),
        (["--run", "r", "--baseline", "popularity"], "give exactly one of --run RUN or --baseline popularity"),
        ([], "give exactly one of --run RUN or --baseline popularity"),
    ],
)
def test_cli_baseline_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_validation_users_are_capped_by_the_pair_budget(data: Path) -> None:
    from contracts.dataset import VALID
    from model.evaluate import sample_users_within

    ds = load_dataset(data)
    every = sample_users(ds, VALID, 10_000, 0)
    assert sample_users_within(ds, VALID, 10_000, 0, pair_budget=10**12).tolist() == every.tolist()
    assert sample_users_within(ds, VALID, 30, 0, pair_budget=10**12).size == 30
    few = sample_users_within(ds, VALID, 10_000, 0, pair_budget=2_000)  # 200 entities: ~10 user-domains
    assert few.size == 10 and set(few.tolist()) <= set(every.tolist())  # the floor of 10 users
    it = ds.interactions
    sel = np.asarray(it.split) == VALID
    mid = sample_users_within(ds, VALID, 10_000, 0, pair_budget=20_000)
    pairs = sum(int(ds.entities.in_domain(int(k)).sum())
                for u in mid for k in np.unique(np.asarray(it.domain)[sel & (np.asarray(it.user) == u)]))  # fmt: skip
    assert 10 < mid.size < every.size and pairs <= 20_000
