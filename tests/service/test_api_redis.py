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


@pytest.mark.redis
def test_sigterm_finishes_in_flight_requests(
    bundle_dir: Path, dataset_dir: Path, redis_prefix: str, redis_proxy: TcpProxy, tmp_path: Path
) -> None:
    """`unimatch serve` as operators run it: SIGTERM while a request waits on a slow Redis -> it still gets its 200."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    from tests.service.conftest import free_port

    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    port = free_port()
    env = {
        **os.environ,
        "UNIMATCH_REDIS_KEY_PREFIX": redis_prefix,
        "UNIMATCH_REDIS_TIMEOUT_S": "3",
        "UNIMATCH_DEADLINE_MS": "5000",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "unimatch.cli", "serve", "--bundle", str(bundle_dir), "--port", str(port),
           "--redis-url", redis_proxy.url(redis_db()), "--graceful-timeout", "10"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("service did not become ready: " + (tmp_path / "serve.log").read_text()[-2000:])
        redis_proxy.delay_s = 1.0
        result: dict[str, object] = {}

        def call() -> None:
            r = httpx.post(f"{base}/match", json=REQ, timeout=20)
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.4)  # the request is now waiting on Redis
        proc.send_signal(signal.SIGTERM)
        t.join(20)
        assert result.get("status") == 200, result
        body = result["body"]
        assert isinstance(body, dict) and body["degraded"] is False and body["stats"]["feature_source"] == "redis"
        # uvicorn re-raises the caught SIGTERM after a clean shutdown, so the status is -15 (or 0 on older ones)
        assert proc.wait(20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "shutting down" in text and "Application shutdown complete" in text


def test_start_with_redis_down_serves_degraded(bundle_dir: Path) -> None:
    """Redis unreachable at start-up is not fatal: the replica is ready and answers degraded."""
    from tests.service.conftest import free_port

    settings = Settings(bundle=bundle_dir, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.05)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["feature_store"]["status"] == "down"
        body = client.post("/match", json=REQ).json()
        assert body["degraded"] is True and body["cold_start"] is True and len(body["items"]) == 5
        assert client.get("/v1/info").json()["feature_store"]["kind"] == "redis"
