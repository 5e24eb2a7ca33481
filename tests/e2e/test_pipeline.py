"""The whole path on the tiny preset, through the operator commands of CONTRACT.md.

data synth -> train (Backbone&RRL) -> eval -> export -> index build -> bench search -> the HTTP
service answering POST /match from the embedded feature store and from Redis, with the same items as
the engine called directly on the dataset's features. Each step is the real code; only sizes are
small. This is what `make demo` does, minus the long-running server.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from unimatch.cli import main

REDIS_URL = os.environ.get("UNIMATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def unimatch(*args: object) -> None:
    rc = main([str(a) for a in args])
    assert rc == 0, f"unimatch {' '.join(map(str, args))} exited {rc}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    w = tmp_path_factory.mktemp("pipeline")
    data, run, bundle = w / "data", w / "run", w / "bundle"
    unimatch("data", "synth", "--out", data, "--preset", "tiny", "--seed", "1")
    unimatch("train", "--data", data, "--method", "backbone-rrl", "--out", run, "--max-steps", 40, "--no-progress")
    unimatch("eval", "--run", run, "--data", data, "--n", "50,200", "--users", 100, "--json", w / "eval.json", "--no-progress")
    unimatch("export", "--run", run, "--out", bundle)
    unimatch("index", "build", "--bundle", bundle)
    return {"w": w, "data": data, "run": run, "bundle": bundle}


def test_eval_writes_the_contract_json(pipeline: dict[str, Path]) -> None:
    got = json.loads((pipeline["w"] / "eval.json").read_text())
    schema = json.loads((pipeline["data"] / "schema.json").read_text())
    for domain in [*schema["domains"], "average"]:
        recalls = got["recall_all"][domain]
        assert set(recalls) == {"50", "200"}
        assert 0.0 <= recalls["50"] <= recalls["200"] <= 1.0


def test_index_has_exactly_four_layers(pipeline: dict[str, Path]) -> None:
    health = json.loads((pipeline["bundle"] / "graph_health.json").read_text())
    assert health["layers"] == 4 and len(health["nodes_per_layer"]) == 4
    assert health["nodes_per_layer"][0] == 2000 and health["nodes_per_layer"][3] >= 1
    assert health["l2_recall_at_100"] > 0.9


def test_bench_search_writes_the_contract_json(pipeline: dict[str, Path]) -> None:
    out = pipeline["w"] / "bench.json"
    unimatch("bench", "search", "--bundle", pipeline["bundle"], "--data", pipeline["data"], "--users", 20,
             "--k", "50", "--no-sweep", "--json", out, "--md", pipeline["w"] / "bench.md", "--plot", pipeline["w"] / "bench.png")
    got = json.loads(out.read_text())
    assert got["catalogue_size"] == 2000
    row = got["k"]["50"]
    for key in ("coverage", "recall_all", "recall_retrieval", "scored_fraction", "latency_ms_p50",
                "latency_ms_p99", "scorer_time_share", "speedup_vs_exhaustive"):
        assert key in row
    assert 0.0 <= row["coverage"] <= 1.0 and row["scored_fraction"] > 0
    assert got["exhaustive"]["latency_ms_p50"] > 0


def _engine_reference(pipeline: dict[str, Path], user_row: int, domain: int, k: int):
    from contracts.bundle import load_bundle
    from contracts.dataset import load_dataset, serving_sequences
    from contracts.features import UserFeatures
    from service.engine import MatchEngine

    ds = load_dataset(pipeline["data"])
    seq = serving_sequences(ds)[user_row]
    features = UserFeatures(
        cat=np.asarray(ds.users.cat[user_row], dtype=np.int64),
        num=np.asarray(ds.users.num[user_row], dtype=np.float32),
        seq=seq.astype(np.int64),
    )
    engine = MatchEngine(load_bundle(pipeline["bundle"]))
    return engine.match(features, domain, k), engine.bundle, str(ds.users.external_id[user_row])


def _check_same(body: dict, result, bundle) -> None:
    assert [it["entity_id"] for it in body["items"]] == [str(bundle.entity_ids[r]) for r in result.rows]
    np.testing.assert_allclose([it["score"] for it in body["items"]], result.scores, rtol=1e-5, atol=1e-6)


def test_service_answers_like_the_engine_from_the_embedded_store(pipeline: dict[str, Path]) -> None:
    from service.app import create_app
    from service.config import Settings

    ref, bundle, user_id = _engine_reference(pipeline, user_row=7, domain=2, k=25)
    with TestClient(create_app(Settings(bundle=pipeline["bundle"], data=pipeline["data"]))) as client:
        info = client.get("/v1/info").json()
        assert info["domains"] == bundle.schema.domains
        assert client.get("/readyz").status_code == 200
        r = client.post("/match", json={"user_id": user_id, "domain": bundle.schema.domains[2], "k": 25})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cold_start"] is False and body["degraded"] is False
        _check_same(body, ref, bundle)
        assert client.post("/match", json={"user_id": user_id, "domain": "nope", "k": 5}).status_code in (400, 404, 422)


@pytest.mark.redis
def test_service_answers_like_the_engine_from_redis(pipeline: dict[str, Path]) -> None:
    redis = pytest.importorskip("redis")
    from service.app import create_app
    from service.config import Settings

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        unimatch("features", "load", "--data", pipeline["data"], "--redis-url", REDIS_URL, "--prefix", prefix)
        ref, bundle, user_id = _engine_reference(pipeline, user_row=11, domain=0, k=10)
        settings = Settings(bundle=pipeline["bundle"], redis_url=REDIS_URL, redis_key_prefix=prefix, redis_timeout_s=1.0)
        with TestClient(create_app(settings)) as client:
            r = client.post("/match", json={"user_id": user_id, "domain": bundle.schema.domains[0], "k": 10})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["degraded"] is False and body["cold_start"] is False
            assert body["stats"]["feature_source"] == "redis"
            _check_same(body, ref, bundle)
    finally:
        client_ = redis.Redis.from_url(REDIS_URL)
        keys = list(client_.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client_.delete(*keys)
