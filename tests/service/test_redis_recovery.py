"""Redis recovery: stale connections after a restart, an empty or foreign Redis, slow vs down.

The breaker and retry logic is driven with a fake client (deterministic); the restart and the empty
Redis use the machine's real Redis (through the test proxy, a fresh key prefix each).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.features import RedisFeatureStore, encode_user, load_features, sentinel_key, user_key
from tests.fixtures.fake_bundle import fake_schema
from tests.service.conftest import REDIS_URL, TcpProxy, redis_db

SCHEMA = fake_schema()
REQ = {"user_id": "user-0004", "domain": "domain_0", "k": 5}


class FakePool:
    def __init__(self) -> None:
        self.disconnects: list[bool] = []

    async def disconnect(self, inuse_connections: bool = True) -> None:
        self.disconnects.append(inuse_connections)


class FakeClient:
    """Answers MGET from a script: an exception class to raise, or a list of values."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.connection_pool = FakePool()
        self.calls = 0

    async def mget(self, keys: list[bytes]) -> list[bytes | None]:
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, type) and issubclass(step, BaseException):
            raise step("scripted")
        return step

    async def exists(self, key: str) -> int:
        return 0


def _store(script: list[Any]) -> tuple[RedisFeatureStore, FakeClient]:
    store = RedisFeatureStore(url="redis://127.0.0.1:1/0", prefix="t", timeout_s=0.5, retry_interval_s=60)
    fake = FakeClient(script)
    store._client = fake  # type: ignore[assignment]
    return store, fake


def _value() -> bytes:
    import numpy as np

    cat = np.zeros(len(SCHEMA.user_categorical), np.int64)
    num = np.zeros(len(SCHEMA.user_numeric), np.float32)
    seq = np.full(SCHEMA.max_seq_len, -1, np.int64)
    seq[-1] = 3
    return encode_user(cat, num, seq)


def test_a_connection_error_drops_idle_connections_and_retries_once() -> None:
    import redis.exceptions as rexc

    store, fake = _store([rexc.ConnectionError, [_value(), b"{}"]])
    lookup = asyncio.run(store.get("u1", SCHEMA))
    assert not lookup.degraded and lookup.features is not None  # the retry on a fresh connection answered
    assert fake.calls == 2 and fake.connection_pool.disconnects == [False]  # idle ones only


def test_two_connection_errors_open_the_breaker() -> None:
    import redis.exceptions as rexc

    store, fake = _store([rexc.ConnectionError, rexc.ConnectionError])
    first = asyncio.run(store.get("u1", SCHEMA))
    second = asyncio.run(store.get("u1", SCHEMA))
    assert first.degraded and first.error == "connection"
    assert second.degraded and second.error == "skipped" and fake.calls == 2  # no new attempt while open


def test_a_lone_timeout_is_slow_not_down() -> None:
    import redis.exceptions as rexc

    ok = [_value(), b"{}"]
    store, fake = _store([rexc.TimeoutError, list(ok), rexc.TimeoutError, rexc.TimeoutError, rexc.TimeoutError, list(ok)])
    assert asyncio.run(store.get("u1", SCHEMA)).error == "timeout"
    assert not asyncio.run(store.get("u1", SCHEMA)).degraded  # the breaker did not open on one timeout
    errors = [asyncio.run(store.get("u1", SCHEMA)).error for _ in range(4)]
    assert errors == ["timeout", "timeout", "timeout", "skipped"]  # the third in a row opens it


def test_a_missing_sentinel_flags_every_answer() -> None:
    store, _ = _store([[_value(), None], [None, None, None]])
    one = asyncio.run(store.get("u1", SCHEMA))
    many = asyncio.run(store.get_many(["u1", "u2"], SCHEMA))
    assert one.degraded and one.error == "empty_store" and one.features is None
    assert all(lk.degraded and lk.error == "empty_store" for lk in many)


# ---- against the real Redis -------------------------------------------------------------------------
def _settings(bundle_dir: Path, url: str, prefix: str) -> Settings:
    return Settings(bundle=bundle_dir, redis_url=url, redis_key_prefix=prefix, redis_timeout_s=0.2, redis_retry_interval_s=1.0)


@pytest.mark.redis
def test_no_degraded_answer_after_a_restart(bundle_dir: Path, dataset_dir: Path, redis_prefix: str, redis_proxy: TcpProxy) -> None:
    """Every pooled connection is dead after the restart; the first use of each reconnects silently."""
    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    with TestClient(create_app(_settings(bundle_dir, redis_proxy.url(redis_db()), redis_prefix))) as client:
        batch = [{**REQ, "user_id": f"user-{i:04d}"} for i in range(8)]
        assert not any(r["degraded"] for r in client.post("/match/batch", json={"requests": batch}).json()["results"])
        redis_proxy.stop()  # closes every connection: Redis restarted
        redis_proxy.start()
        answers = [client.post("/match", json=REQ).json() for _ in range(20)]
        assert [a["degraded"] for a in answers] == [False] * 20
        assert all(not a["cold_start"] for a in answers)


@pytest.mark.redis
def test_an_empty_redis_is_flagged_on_every_answer(bundle_dir: Path, dataset_dir: Path, redis_prefix: str) -> None:
    import redis

    with TestClient(create_app(_settings(bundle_dir, REDIS_URL, redis_prefix))) as client:
        empty = [client.post("/match", json={**REQ, "user_id": f"user-{i:04d}"}).json() for i in range(10)]
        assert all(a["degraded"] and a["cold_start"] for a in empty)
        ready = client.get("/readyz").json()["feature_store"]
        assert ready["status"] == "empty" and ready["degraded"] is True and ready["sentinel"] is False
        assert 'unimatch_degraded_answers_total{cause="empty_store"}' in client.get("/metrics").text

        load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
        loaded = [client.post("/match", json={**REQ, "user_id": f"user-{i:04d}"}).json() for i in range(2, 10)]
        assert not any(a["degraded"] for a in loaded) and not any(a["cold_start"] for a in loaded)
        assert client.get("/readyz").json()["feature_store"]["status"] == "ok"

        # a load written before the sentinel existed (meta only) is still trusted
        r = redis.Redis.from_url(REDIS_URL)
        r.delete(sentinel_key(redis_prefix, SCHEMA.fingerprint()))
        assert r.exists(user_key(redis_prefix, SCHEMA.fingerprint(), "user-0004"))
        r.close()
        assert client.post("/match", json=REQ).json()["degraded"] is False
