"""Feature store: binary codec, the Redis loader, the Redis store (outage, recovery) and the embedded store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.dataset import load_dataset, serving_sequences
from service.features import (
    EmbeddedFeatureStore,
    FeatureFormatError,
    RedisFeatureStore,
    decode_user,
    encode_user,
    encode_users,
    load_features,
    meta_key,
    user_key,
)
from tests.fixtures.fake_bundle import fake_schema
from tests.service.conftest import REDIS_URL, TcpProxy, free_port, redis_db

SCHEMA = fake_schema()
L = SCHEMA.max_seq_len


@given(
    n=st.integers(0, L),
    cat=st.lists(st.integers(0, 2), min_size=2, max_size=2),
    num=st.lists(st.floats(-1e6, 1e6, width=32), min_size=2, max_size=2),
    rows=st.lists(st.integers(0, 2**31 - 1), min_size=L, max_size=L),
)
@settings(max_examples=60, deadline=None, database=None)
def test_codec_round_trip(n: int, cat: list[int], num: list[float], rows: list[int]) -> None:
    seq = np.full(L, -1, np.int64)
    if n:
        seq[L - n :] = rows[:n]
    value = encode_user(np.array(cat), np.array(num, np.float32), seq)
    assert len(value) == 4 * (n + 2 + 2)  # padding is not stored
    out = decode_user(value, SCHEMA)
    np.testing.assert_array_equal(out.seq, seq)
    np.testing.assert_array_equal(out.cat, cat)
    np.testing.assert_array_equal(out.num, np.array(num, np.float32))


def test_batch_encoding_matches_single() -> None:
    rng = np.random.default_rng(0)
    seq = np.full((5, L), -1, np.int64)
    for u, n in enumerate([0, 1, 3, L, 5]):
        if n:
            seq[u, L - n :] = rng.integers(0, 100, n)
    cat, num = rng.integers(0, 3, (5, 2)), rng.normal(size=(5, 2)).astype(np.float32)
    records, starts = encode_users(cat, num, seq)
    for u in range(5):
        assert records[u, starts[u] :].tobytes() == encode_user(cat[u], num[u], seq[u])


@pytest.mark.parametrize("value", [b"", b"\x00" * 15, b"\x00" * (4 * (4 + L + 1)), b"\x00" * 17])
def test_decode_rejects_values_that_do_not_fit_the_schema(value: bytes) -> None:
    with pytest.raises(FeatureFormatError):
        decode_user(value, SCHEMA)


def test_decode_rejects_negative_rows_and_nan() -> None:
    with pytest.raises(FeatureFormatError):
        decode_user(encode_user(np.zeros(2), np.zeros(2, np.float32), np.array([-1] * (L - 1) + [-5])), SCHEMA)
    with pytest.raises(FeatureFormatError):
        decode_user(encode_user(np.zeros(2), np.array([np.nan, 0], np.float32), np.full(L, -1)), SCHEMA)


def test_key_layout_carries_version_and_schema_fingerprint() -> None:
    fp = SCHEMA.fingerprint()
    assert user_key("um", fp, "ü/1") == f"um:v1:{fp}:u:ü/1".encode()
    assert meta_key("um", fp) == f"um:v1:{fp}:meta"


def test_embedded_store_serves_the_serving_sequences(dataset_dir: Path) -> None:
    store = EmbeddedFeatureStore(dataset_dir)
    ds = load_dataset(dataset_dir)
    seqs = serving_sequences(ds)
    for row in (0, 1, 7):
        got = asyncio.run(store.get(str(ds.users.external_id[row]), SCHEMA))
        assert got.features is not None and not got.degraded
        np.testing.assert_array_equal(got.features.seq, seqs[row])
        np.testing.assert_array_equal(got.features.cat, ds.users.cat[row])
    assert (got.features.seq >= -1).all()
    assert asyncio.run(store.get("nobody", SCHEMA)).features is None
    assert (seqs[0] == -1).all() and (seqs[1] >= 0).all()  # the fixture's empty and full histories


@pytest.mark.redis
def test_loader_writes_every_user_idempotently(dataset_dir: Path, redis_prefix: str) -> None:
    import redis

    report = load_features(dataset_dir, REDIS_URL, prefix=redis_prefix, chunk=50)
    ds = load_dataset(dataset_dir)
    assert report.users == len(ds.users)
    client = redis.Redis.from_url(REDIS_URL)
    fp = SCHEMA.fingerprint()
    keys = set(client.scan_iter(match=f"{redis_prefix}:v1:{fp}:u:*", count=1000))
    assert len(keys) == len(ds.users)
    seqs = serving_sequences(ds)
    for row in range(len(ds.users)):
        value = client.get(user_key(redis_prefix, fp, str(ds.users.external_id[row])))
        got = decode_user(value, SCHEMA)
        np.testing.assert_array_equal(got.seq, seqs[row])
        np.testing.assert_array_equal(got.num, ds.users.num[row])
    meta = client.hgetall(meta_key(redis_prefix, fp))
    assert int(meta[b"users"]) == len(ds.users)
    again = load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    assert again.users == report.users
    assert len(set(client.scan_iter(match=f"{redis_prefix}:*", count=1000))) == len(ds.users) + 2  # users, meta, sentinel
    client.close()


@pytest.mark.redis
def test_redis_store_reads_what_the_loader_wrote(dataset_dir: Path, redis_prefix: str) -> None:
    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)
    embedded = EmbeddedFeatureStore(dataset_dir)
    outcomes: list[str] = []

    async def run() -> None:
        store = RedisFeatureStore(REDIS_URL, prefix=redis_prefix, on_result=lambda o, s: outcomes.append(o))
        try:
            for uid in ("user-0000", "user-0001", "user-0042"):
                got = await store.get(uid, SCHEMA)
                ref = embedded.lookup_now(uid, SCHEMA)
                assert got.features is not None and ref.features is not None and not got.degraded
                np.testing.assert_array_equal(got.features.seq, ref.features.seq)
                np.testing.assert_array_equal(got.features.cat, ref.features.cat)
            many = await store.get_many(["user-0003", "nobody", "user-0004"], SCHEMA)
            assert [m.features is None for m in many] == [False, True, False]
            assert not any(m.degraded for m in many)
            health = await store.health(SCHEMA)
            assert health["status"] == "ok" and health["users"] == len(embedded)
        finally:
            await store.close()

    asyncio.run(run())
    assert outcomes and set(outcomes) == {"ok"}


def test_redis_store_down_is_degraded_fast_and_skipped() -> None:
    """Nothing listens on the port: a degraded cold start within the timeout, then the breaker skips."""
    outcomes: list[str] = []

    async def run() -> None:
        store = RedisFeatureStore(
            f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05, retry_interval_s=30, on_result=lambda o, s: outcomes.append(o)
        )
        t0 = time.perf_counter()
        first = await store.get("user-0001", SCHEMA)
        assert time.perf_counter() - t0 < 0.5
        assert first.features is None and first.degraded and first.error == "connection"
        second = await store.get("user-0001", SCHEMA)
        assert second.degraded and second.error == "skipped"
        assert (await store.health(SCHEMA))["status"] == "down"
        await store.close()

    asyncio.run(run())
    assert outcomes[0] == "connection"


@pytest.mark.redis
def test_redis_store_recovers_after_an_outage(dataset_dir: Path, redis_prefix: str, redis_proxy: TcpProxy) -> None:
    load_features(dataset_dir, REDIS_URL, prefix=redis_prefix)

    async def run() -> None:
        store = RedisFeatureStore(redis_proxy.url(redis_db()), prefix=redis_prefix, timeout_s=0.1, retry_interval_s=0.2)
        try:
            assert (await store.get("user-0002", SCHEMA)).features is not None
            redis_proxy.stop()
            down = await store.get("user-0002", SCHEMA)
            assert down.degraded and down.features is None
            redis_proxy.start()
            await asyncio.sleep(0.3)  # past retry_interval_s
            for _ in range(3):  # a pooled connection cut by the outage may fail once more
                back = await store.get("user-0002", SCHEMA)
                if not back.degraded:
                    break
                await asyncio.sleep(0.25)
            assert back.features is not None and not back.degraded
        finally:
            await store.close()

    asyncio.run(run())
