"""`unimatch bench search` end to end on the fake bundle + a matching dataset (small, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bench.search_bench import BenchConfig, BenchError, run_search_bench
from service.engine import SearchParams
from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset
from unimatch.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    bundle = make_fake_bundle(root / "bundle", num_entities=1500, dim=16, seed=2)
    two_tower = make_fake_bundle(root / "tt", num_entities=1500, dim=16, seed=2, kind="two-tower", with_graph=False)
    data = make_fake_dataset(root / "data", bundle, num_users=60)
    return bundle, two_tower, data


def test_cli_writes_contract_json_markdown_and_plot(setup, tmp_path: Path) -> None:
    bundle, two_tower, data = setup
    out = tmp_path / "docs"
    rc = main([
        "bench", "search", "--bundle", str(bundle), "--data", str(data), "--users", "30", "--k", "10,50",
        "--json", str(out / "b.json"), "--md", str(out / "b.md"), "--plot", str(out / "b.png"),
        "--two-tower", str(two_tower), "--sweep-users", "10", "--threads", "2",
    ])
    assert rc == 0
    res = json.loads((out / "b.json").read_text())
    assert res["catalogue_size"] == 1500 and set(res["k"]) == {"10", "50"}
    for row in res["k"].values():
        for key in ("coverage", "recall_all", "recall_retrieval", "scored_fraction", "latency_ms_p50",
                    "latency_ms_p99", "scorer_time_share", "speedup_vs_exhaustive"):
            assert isinstance(row[key], float), key
        assert 0 <= row["coverage"] <= 1 and 0 < row["scored_fraction"] <= 1 and 0 < row["scorer_time_share"] <= 1
        # the time split adds up: pair scorer + user encoder + outside onnxruntime = the query
        assert 0 <= row["gather_share"] <= row["outside_ort_share"] < 1
        assert row["scorer_time_share"] + row["user_encode_share"] + row["outside_ort_share"] == pytest.approx(1.0)
        assert row["latency_ms_p50"] <= row["latency_ms_p99"]
    assert res["exhaustive"]["latency_ms_p50"] > 0
    assert set(res["two_tower"]) == {"10", "50"} and 0 <= res["two_tower"]["50"]["recall_retrieval"] <= 1
    assert len(res["sweep"]["series"]) == 1 and len(next(iter(res["sweep"]["series"].values()))) == 20
    md = (out / "b.md").read_text()
    assert "coverage@k" in md and "unimatch bench search" in md and "b.png" in md
    assert (out / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_full_width_params_give_full_coverage(setup) -> None:
    bundle, _, data = setup
    wide = SearchParams(ef=(1500,) * 4, steps=(30,) * 4, top_n=(1500,) * 4, exhaustive_threshold=0)
    res = run_search_bench(BenchConfig(bundle=bundle, data=data, users=10, ks=(20,), params=wide, sweep=False), log=lambda m: None)
    assert res["k"]["20"]["coverage"] == 1.0
    assert res["k"]["20"]["recall_retrieval"] == res["k"]["20"]["recall_all"]


def test_schema_mismatch_is_reported(setup, tmp_path: Path) -> None:
    _, _, data = setup
    other = make_fake_bundle(tmp_path / "o", num_entities=100, dim=4, num_domains=3)
    with pytest.raises(BenchError, match="schema differs"):
        run_search_bench(BenchConfig(bundle=other, data=data, users=5, ks=(5,)), log=lambda m: None)


def test_k_above_catalogue_is_reported(setup) -> None:
    bundle, _, data = setup
    with pytest.raises(BenchError, match="exceeds"):
        run_search_bench(BenchConfig(bundle=bundle, data=data, users=5, ks=(5000,)), log=lambda m: None)
