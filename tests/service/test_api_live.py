"""Live catalogue over HTTP: /admin/entities* acknowledged once logged and applied; a second worker follows."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.features import load_features
from tests.service.conftest import REDIS_URL

AUTH = {"authorization": "Bearer s3cret"}


def _settings(bundle: Path, prefix: str, **kw: object) -> Settings:
    return Settings(bundle=bundle, redis_url=REDIS_URL, redis_key_prefix=prefix, admin_token="s3cret", live_changes=True,
                    live_capacity=200, live_poll_s=0.05, shadow_rate=0.0, **kw)  # type: ignore[arg-type]


def _entity(eid: str, **kw: object) -> dict:
    return {"entity_id": eid, "entity_type": "item", "domains": ["domain_0", "domain_1"],
            "categorical": {"category": 2}, "numeric": {"price": 0.1}, **kw}


@pytest.mark.redis
def test_changes_over_http_and_a_second_worker(bundle_dir: Path, dataset_dir: Path, redis_prefix: str) -> None:
    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    users = [f"user-{i:04d}" for i in range(12)]
    with TestClient(create_app(_settings(bundle_dir, redis_prefix))) as w1, \
            TestClient(create_app(_settings(bundle_dir, redis_prefix))) as w2:
        assert w1.post("/admin/entities", json={"entities": [_entity("x")]}).status_code == 401
        bad = w1.post("/admin/entities", json={"entities": [_entity("x", entity_type="planet")]}, headers=AUTH)
        assert bad.status_code == 422 and "planet" in bad.json()["error"]["message"]
        ack = w1.post("/admin/entities", json={"entities": [_entity(f"live-{i}") for i in range(20)]}, headers=AUTH)
        assert ack.status_code == 200, ack.text
        body = ack.json()
        assert body["op"] == "upsert" and body["applied"] == 20 and body["overlay_rows"] == 20 and body["position"]
        # what the users get now, on worker 1: pause all of it, then none of it comes back on either worker
        served: set[str] = set()
        for u in users:
            served |= {it["entity_id"] for it in w1.post("/match", json={"user_id": u, "domain": "domain_0", "k": 8}).json()["items"]}
        ack = w1.post("/admin/entities/pause", json={"ids": sorted(served)}, headers=AUTH).json()
        assert ack["applied"] == len(served)
        for u in users:  # the acknowledging worker: at once
            got = {it["entity_id"] for it in w1.post("/match", json={"user_id": u, "domain": "domain_0", "k": 8}).json()["items"]}
            assert not got & served
        pos = ack["position"]
        for _ in range(100):  # the other worker: within its poll interval
            if w2.get("/v1/info").json()["search"]["live"]["position"] == pos:
                break
            time.sleep(0.05)
        info = w2.get("/v1/info").json()["search"]["live"]
        assert info["applier_priority"] == ("idle" if hasattr(os, "SCHED_IDLE") else "nice 19")  # the default
        assert info["position"] == pos and info["overlay_rows"] == 20 and info["paused"] == len(served)
        for u in users:
            for domain in ("domain_0", "domain_1"):
                got = {it["entity_id"] for it in w2.post("/match", json={"user_id": u, "domain": domain, "k": 30}).json()["items"]}
                assert not got & served
        # exclude works on entities added online; unknown ids in pause are skipped, not an error
        skip = w1.post("/admin/entities/delete", json={"ids": ["never-there"]}, headers=AUTH).json()
        assert skip["skipped"] == 1 and skip["applied"] == 0
        metrics = w1.get("/metrics").text
        assert "unimatch_live_overlay_rows 20.0" in metrics and 'unimatch_live_changes_total{op="pause",outcome="applied"}' in metrics
    # a worker started later replays the log: same state
    with TestClient(create_app(_settings(bundle_dir, redis_prefix))) as w3:
        info3 = w3.get("/v1/info").json()["search"]["live"]
        assert info3["position"] == skip["position"] and info3["overlay_rows"] == 20 and info3["paused"] == len(served)


@pytest.mark.redis
def test_the_applier_thread_takes_the_configured_priority(bundle_dir: Path, redis_prefix: str) -> None:
    with TestClient(create_app(_settings(bundle_dir, redis_prefix, live_apply_priority="nice"))) as w:
        for _ in range(100):  # the applier thread sets it as it starts
            info = w.get("/v1/info").json()["search"]["live"]
            if info["applier_priority"] is not None:
                break
            time.sleep(0.02)
        assert info["applier_priority"] == "nice 19"
        ack = w.post("/admin/entities", json={"entities": [_entity("p-1")]}, headers=AUTH)
        assert ack.status_code == 200 and ack.json()["applied"] == 1


def test_live_changes_need_redis(bundle_dir: Path) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        Settings(bundle=bundle_dir, live_changes=True)


def test_change_routes_are_404_when_live_changes_are_off(bundle_dir: Path) -> None:
    with TestClient(create_app(Settings(bundle=bundle_dir, admin_token="s3cret", shadow_rate=0.0))) as client:  # type: ignore[arg-type]
        r = client.post("/admin/entities", json={"entities": [_entity("x")]}, headers=AUTH)
        assert r.status_code == 404
