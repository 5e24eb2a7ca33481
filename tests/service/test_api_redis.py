"""The service against a Redis that goes away mid-test (through a proxy we cut) and comes back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.features import load_features
from tests.service.conftest import REDIS_URL, TcpProxy, redis_db

REQ = {"user_id": "user-0004", "domain": "domain_0", "k": 5}


@pytest.mark.redis
def test_redis_outage_degrades_then_recovers(
    bundle_dir: Path, dataset_dir: Path, redis_prefix: str, redis_proxy: TcpProxy
) -> None:
    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    settings = Settings(
        bundle=bundle_dir,
        redis_url=redis_proxy.url(redis_db()),
        redis_key_prefix=redis_prefix,
        redis_timeout_s=0.1,
        redis_retry_interval_s=0.2,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ok = client.post("/match", json=REQ).json()
        assert ok["degraded"] is False and ok["cold_start"] is False and ok["stats"]["feature_source"] == "redis"

        redis_proxy.stop()
        t0 = time.perf_counter()
        down = client.post("/match", json=REQ)
        elapsed = time.perf_counter() - t0
        assert down.status_code == 200, down.text
        body = down.json()
        assert body["degraded"] is True and body["cold_start"] is True and len(body["items"]) == 5
        assert elapsed < 1.0  # bounded by the Redis timeout, not a hang
        batch = client.post("/match/batch", json={"requests": [REQ, REQ]}).json()["results"]
        assert all(r["degraded"] for r in batch)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["feature_store"]["status"] == "down"
        metrics = client.get("/metrics").text
        assert 'unimatch_matches_flagged_total{flag="degraded"}' in metrics
        assert "unimatch_redis_failures_total{" in metrics

        redis_proxy.start()
        recovered = None
        for _ in range(40):  # recovers by itself: no restart, no admin call
            recovered = client.post("/match", json=REQ).json()
            if not recovered["degraded"]:
                break
            time.sleep(0.1)
        assert recovered is not None and recovered["degraded"] is False and recovered["cold_start"] is False
        assert recovered["items"] == ok["items"]
        assert client.get("/readyz").json()["feature_store"]["status"] == "ok"


@pytest.mark.redis
def test_slow_redis_is_cut_at_the_timeout(bundle_dir: Path, dataset_dir: Path, redis_prefix: str, redis_proxy: TcpProxy) -> None:
    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    settings = Settings(
        bundle=bundle_dir,
        redis_url=redis_proxy.url(redis_db()),
        redis_key_prefix=redis_prefix,
        redis_timeout_s=0.05,
        redis_retry_interval_s=0.2,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post("/match", json=REQ).json()["degraded"] is False
        redis_proxy.delay_s = 0.5
        t0 = time.perf_counter()
        slow = client.post("/match", json=REQ)
        elapsed = time.perf_counter() - t0
        assert slow.status_code == 200 and slow.json()["degraded"] is True
        assert elapsed < 0.45, elapsed  # did not wait for the 0.5 s reply
        assert 'unimatch_redis_failures_total{kind="timeout"}' in client.get("/metrics").text
        redis_proxy.delay_s = 0.0
        recovered = None
        for _ in range(40):
            recovered = client.post("/match", json=REQ).json()
            if not recovered["degraded"]:
                break
            time.sleep(0.1)
        assert recovered is not None and recovered["degraded"] is False
