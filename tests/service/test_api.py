"""The HTTP API over a real (fake-model) bundle: results equal the engine, flags, limits, bad input -> 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.service.conftest import REDIS_URL


def make_client(**overrides: object) -> TestClient:
    return TestClient(create_app(Settings(**overrides)), raise_server_exceptions=False)


@pytest.fixture
def client(bundle_dir: Path, dataset_dir: Path) -> Iterator[TestClient]:
    with make_client(bundle=bundle_dir, data=dataset_dir) as c:
        yield c


@pytest.fixture
def engine(bundle_dir: Path):
    from contracts.bundle import load_bundle
    from service.engine import MatchEngine

    return MatchEngine(load_bundle(bundle_dir))


def stored(dataset_dir: Path, user_id: str):
    from contracts.features import UserFeatures
    from service.features import EmbeddedFeatureStore

    f = EmbeddedFeatureStore(dataset_dir).lookup_now(user_id, EmbeddedFeatureStore(dataset_dir).schema).features
    assert f is not None
    return UserFeatures(cat=f.cat, num=f.num, seq=f.seq)


def assert_same_as_engine(body: dict, result, bundle) -> None:
    ids = [it["entity_id"] for it in body["items"]]
    assert ids == [str(bundle.entity_ids[r]) for r in result.rows]
    np.testing.assert_allclose([it["score"] for it in body["items"]], result.scores, rtol=1e-6)
    types = bundle.schema.entity_types
    assert [it["entity_type"] for it in body["items"]] == [types[int(bundle.entity_type[r])] for r in result.rows]


def test_match_equals_the_engines_direct_output(client: TestClient, engine, dataset_dir: Path) -> None:
    for user, domain, k in (("user-0001", "domain_0", 10), ("user-0005", "domain_1", 25), ("user-0000", "domain_0", 3)):
        r = client.post("/match", json={"user_id": user, "domain": domain, "k": k, "request_id": "abc"})
        assert r.status_code == 200, r.text
        body = r.json()
        ref = engine.match(stored(dataset_dir, user), int(domain[-1]), k)
        assert_same_as_engine(body, ref, engine.bundle)
        assert body["request_id"] == "abc" and body["bundle_version"] == engine.bundle.version
        assert body["cold_start"] is False and body["degraded"] is False and body["partial"] is False
        assert body["stats"]["feature_source"] == "embedded"
        assert body["stats"]["pair_evaluations"] > 0
        scores = [it["score"] for it in body["items"]]
        assert scores == sorted(scores, reverse=True)


def test_unknown_user_is_cold_start(client: TestClient, engine) -> None:
    from contracts.features import UserFeatures

    r = client.post("/match", json={"user_id": "never-seen-ü", "domain": "domain_1", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is True and body["degraded"] is False
    assert body["stats"]["feature_source"] == "cold_start"
    assert_same_as_engine(body, engine.match(UserFeatures.cold_start(engine.bundle.schema), 1, 5), engine.bundle)
    assert len(body["request_id"]) == 32  # generated


def test_filters_exclude_and_overrides(client: TestClient, engine, dataset_dir: Path) -> None:
    from contracts.features import UserFeatures

    first = client.post("/match", json={"user_id": "user-0002", "domain": "domain_0", "k": 10}).json()
    drop = [it["entity_id"] for it in first["items"][:4]]
    r = client.post(
        "/match", json={"user_id": "user-0002", "domain": "domain_0", "k": 10, "exclude": [*drop, "no-such-id"], "entity_types": ["shop"]}
    ).json()
    assert all(it["entity_type"] == "shop" for it in r["items"]) and len(r["items"]) == 10
    assert not set(drop) & {it["entity_id"] for it in r["items"]}
    # inline features replace the stored ones: same answer as the engine on those features
    b = engine.bundle
    seq_ids = [str(b.entity_ids[i]) for i in (5, 6, 7)]
    body = {
        "user_id": "user-0002",
        "domain": "domain_1",
        "k": 7,
        "features": {"categorical": {"gender": 2}, "numeric": {"activity": 1.5}, "sequence": [*seq_ids, "unknown-x"]},
    }
    got = client.post("/match", json=body)
    assert got.status_code == 200, got.text
    base = stored(dataset_dir, "user-0002")
    cat, num = base.cat.copy(), base.num.copy()
    cat[1], num[0] = 2, 1.5
    seq = np.full(b.schema.max_seq_len, -1, np.int64)
    seq[-3:] = [5, 6, 7]
    assert_same_as_engine(got.json(), engine.match(UserFeatures(cat=cat, num=num, seq=seq), 1, 7), b)
    assert got.json()["stats"]["unknown_override_ids"] == 1


def test_batch_equals_single_requests(client: TestClient) -> None:
    reqs = [{"user_id": f"user-{i:04d}", "domain": f"domain_{i % 2}", "k": 5} for i in range(6)] + [
        {"user_id": "ghost", "domain": "domain_0", "k": 5}
    ]
    r = client.post("/match/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(reqs)
    for req, res in zip(reqs, results, strict=True):
        single = client.post("/match", json=req).json()
        assert [i["entity_id"] for i in res["items"]] == [i["entity_id"] for i in single["items"]]
        assert res["cold_start"] == (req["user_id"] == "ghost")


def test_deadline_gives_partial_results(bundle_dir: Path, dataset_dir: Path) -> None:
    # exhaustive_threshold 0 forces the graph search, whose steps check the deadline
    with make_client(bundle=bundle_dir, data=dataset_dir, search_exhaustive_threshold=0) as c:
        body = c.post("/match", json={"user_id": "user-0003", "domain": "domain_0", "k": 10, "deadline_ms": 0.001}).json()
        assert body["partial"] is True and body["stats"]["mode"] == "graph"
        full = c.post("/match", json={"user_id": "user-0003", "domain": "domain_0", "k": 10}).json()
        assert full["partial"] is False and len(full["items"]) == 10
        metrics = c.get("/metrics").text
        assert 'unimatch_matches_flagged_total{flag="partial"}' in metrics


def test_overload_is_503_with_retry_after(client: TestClient) -> None:
    state = client.app.state.unimatch
    state.limiter.in_flight = state.limiter.limit  # as if that many requests were being served
    try:
        r = client.post("/match", json={"user_id": "user-0001", "domain": "domain_0", "k": 5})
    finally:
        state.limiter.in_flight = 0
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["kind"] == "overloaded"
    assert client.post("/match", json={"user_id": "user-0001", "domain": "domain_0", "k": 5}).status_code == 200
    # a batch holds one slot per user: 3 free slots do not admit a batch of 4
    state.limiter.in_flight = state.limiter.limit - 3
    try:
        batch = [{"user_id": "u", "domain": "domain_0", "k": 2}]
        assert client.post("/match/batch", json={"requests": batch * 4}).status_code == 503
        assert client.post("/match/batch", json={"requests": batch * 3}).status_code == 200
    finally:
        state.limiter.in_flight = 0


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        (b'{"user_id": "u", "domain": ', 422, "json"),
        (b"not json at all", 422, "json"),
        (json.dumps({"user_id": 5, "domain": "domain_0", "k": 5}).encode(), 422, "string"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": "many"}).encode(), 422, "integer"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": 10**12}).encode(), 422, "less than"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": 5000}).encode(), 422, "UNIMATCH_MAX_K"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": 0}).encode(), 422, "greater"),
        (json.dumps({"user_id": "u", "domain": "nowhere", "k": 5}).encode(), 422, "unknown domain"),
        (json.dumps({"user_id": "u", "domain": "dømain_☃", "k": 5}).encode(), 422, "unknown domain"),
        (json.dumps({"user_id": "", "domain": "domain_0", "k": 5}).encode(), 422, "at least 1"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": 5, "entity_types": ["boat"]}).encode(), 422, "entity types"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": 5, "surprise": 1}).encode(), 422, "extra"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": 5, "features": {"categorical": {"gender": 99}}}).encode(), 422, "outside"),
        (json.dumps({"user_id": "u", "domain": "domain_0", "k": 5, "features": {"numeric": {"nope": 1}}}).encode(), 422, "unknown numeric"),
        (b'{"user_id": "u", "domain": "domain_0", "k": 5, "features": {"numeric": {"activity": NaN}}}', 422, ""),
        (json.dumps(["a", "list"]).encode(), 422, ""),
    ],
)
def test_bad_input_is_a_clear_4xx(client: TestClient, payload: bytes, status: int, fragment: str) -> None:
    r = client.post("/match", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment.lower() in r.text.lower()


def test_k_above_the_eligible_catalogue_is_422(bundle_dir: Path, dataset_dir: Path) -> None:
    with make_client(bundle=bundle_dir, data=dataset_dir, max_k=5000) as c:
        r = c.post("/match", json={"user_id": "user-0001", "domain": "domain_0", "k": 2001})
        assert r.status_code == 422 and "eligible" in r.text
        assert c.post("/match", json={"user_id": "user-0001", "domain": "domain_0", "k": 2000}).status_code == 200


def test_oversized_and_unicode_bodies(bundle_dir: Path, dataset_dir: Path) -> None:
    with make_client(bundle=bundle_dir, data=dataset_dir, max_body_bytes=4096) as c:
        big = json.dumps({"user_id": "u", "domain": "domain_0", "k": 5, "exclude": ["x" * 100] * 100})
        r = c.post("/match", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["kind"] == "body_too_large"

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(10):
                yield b" " * 1000

        r = c.post("/match", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        for uid in ("用户-1", "🙂" * 50, "user\u0000nul", "ʎǝʞ:v1:*"):
            r = c.post("/match", json={"user_id": uid, "domain": "domain_0", "k": 3, "exclude": ["ü", "🙂"]})
            assert r.status_code == 200, r.text
            assert r.json()["cold_start"] is True
        r = c.post("/match/batch", json={"requests": [{"user_id": "u", "domain": "domain_0", "k": 3}] * 65})
        assert r.status_code == 422 and "UNIMATCH_MAX_BATCH" in r.text
        r = c.post("/match/batch", json={"requests": [{"user_id": "u", "domain": "domain_0", "k": 3}, {"user_id": "u", "domain": "x", "k": 3}]})
        assert r.status_code == 422 and "requests[1]" in r.text
        assert c.get("/no/such/route").status_code == 404
        assert c.get("/match").status_code == 405


def test_probes_info_and_metrics(client: TestClient, bundle_dir: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and body["warmed"] and body["feature_store"]["kind"] == "embedded"
    assert body["feature_store"]["entity_space_match"] is True
    info = client.get("/v1/info").json()
    assert info["domains"] == ["domain_0", "domain_1"]
    assert info["feature_store"]["kind"] == "embedded" and info["provider"]
    assert info["graph"]["layers"] == 4 and info["search"]["search_params"]["ef"]
    client.post("/match", json={"user_id": "user-0001", "domain": "domain_0", "k": 5})
    text = client.get("/metrics").text
    for name in (
        "unimatch_request_duration_seconds_bucket",
        'unimatch_stage_duration_seconds_count{stage="features"}',
        'unimatch_stage_duration_seconds_count{stage="user_encoding"}',
        'unimatch_stage_duration_seconds_count{stage="search"}',
        "unimatch_pair_evaluations_count",
        'unimatch_results_total{entity_type="item"}',
        "unimatch_bundle_info{",
        "unimatch_http_requests_total{",
    ):
        assert name in text, name


def test_admin_routes_disabled_without_token(client: TestClient, bundle2_dir: Path) -> None:
    r = client.post("/admin/reload", json={"bundle": str(bundle2_dir)})
    assert r.status_code == 404
    assert "/admin/reload" not in client.get("/openapi.json").json()["paths"]
    assert client.app.state.unimatch.serving.version.endswith("fake0000")


def test_admin_needs_the_bearer_token(bundle_dir: Path, dataset_dir: Path) -> None:
    with make_client(bundle=bundle_dir, data=dataset_dir, admin_token="s3cret") as c:
        assert c.post("/admin/reload").status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": "Basic s3cret"}).status_code == 401
        r = c.post("/admin/reload?wait=true", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["state"] == "succeeded"


@pytest.mark.redis
def test_redis_backed_match_equals_embedded(bundle_dir: Path, dataset_dir: Path, redis_prefix: str) -> None:
    from service.features import load_features

    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    with make_client(bundle=bundle_dir, redis_url=REDIS_URL, redis_key_prefix=redis_prefix) as rc, make_client(
        bundle=bundle_dir, data=dataset_dir
    ) as ec:
        for uid in ("user-0001", "user-0009", "ghost"):
            a = rc.post("/match", json={"user_id": uid, "domain": "domain_1", "k": 8}).json()
            b = ec.post("/match", json={"user_id": uid, "domain": "domain_1", "k": 8}).json()
            assert a["items"] == b["items"]
            assert a["cold_start"] == b["cold_start"] == (uid == "ghost")
            assert a["stats"]["feature_source"] == ("cold_start" if uid == "ghost" else "redis")
        ready = rc.get("/readyz").json()["feature_store"]
        assert ready["status"] == "ok" and ready["loaded"] and ready["entity_space_match"]
        assert rc.get("/v1/info").json()["feature_store"]["kind"] == "redis"
