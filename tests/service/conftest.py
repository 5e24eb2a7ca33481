"""Fixtures of the service tests: a fake bundle, a dataset in the same entity space, Redis, the app.

The bundle is ``tests/fixtures/fake_bundle.py`` (a complete bundle without torch); the dataset is
written here with the bundle's schema and entity ids in the bundle's row order, so the embedded and
Redis feature stores serve features the bundle can score. Redis is the machine's real Redis at
``UNIMATCH_TEST_REDIS_URL`` (default DB 15); each test uses its own key prefix and deletes only it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from contracts.dataset import Entities, Interactions, Users, write_dataset
from tests.fixtures.fake_bundle import fake_schema, make_fake_bundle

REDIS_URL = os.environ.get("UNIMATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
NUM_USERS = 120


@pytest.fixture(autouse=True)
def generous_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built from ``Settings()`` in these tests get a 10 s deadline unless a test sets its own.

    The service's 100 ms default is a production budget; on a shared, loaded test machine the admission
    control would (rightly) refuse requests it measures as unable to meet it, and a test about answers,
    not about overload, would see a 503. Tests of deadlines and admission pass ``deadline_ms`` themselves.
    """
    monkeypatch.setenv("UNIMATCH_DEADLINE_MS", "10000")


def make_dataset(path: Path, bundle: Path, *, num_users: int = NUM_USERS, seed: int = 0) -> Path:
    """A dataset whose schema and entity rows are those of ``bundle`` (so sequences are bundle rows)."""
    rng = np.random.default_rng(seed)
    schema = fake_schema()
    ids = np.load(bundle / "entities/external_id.npy")
    etype = np.load(bundle / "entities/entity_type.npy")
    mask = np.load(bundle / "entities/domain_mask.npy")
    n_ent = len(ids)
    users = Users(
        external_id=np.array([f"user-{i:04d}" for i in range(num_users)]),
        cat=np.stack([rng.integers(0, c.cardinality, num_users) for c in schema.user_categorical], axis=1).astype(np.int32),
        num=rng.normal(size=(num_users, len(schema.user_numeric))).astype(np.float32),
    )
    entities = Entities(
        external_id=ids,
        entity_type=etype,
        cat=rng.integers(0, 9, (n_ent, 1)).astype(np.int32),
        num=rng.normal(size=(n_ent, 1)).astype(np.float32),
        domain_mask=mask,
    )
    # 0..29 interactions per user; user 0 has none (a known user with an empty history)
    counts = rng.integers(0, 30, num_users)
    counts[0] = 0
    counts[1] = 2 * schema.max_seq_len  # longer than the sequence: truncated to the latest L
    user = np.repeat(np.arange(num_users, dtype=np.int32), counts)
    n = len(user)
    inter = Interactions(
        user=user,
        entity=rng.integers(0, n_ent, n).astype(np.int32),
        domain=np.zeros(n, np.int16),
        timestamp=np.arange(n, dtype=np.int64),
        split=np.zeros(n, np.int8),
    )
    return write_dataset(path, schema=schema, users=users, entities=entities, interactions=inter)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_bundle(tmp_path_factory.mktemp("bundle") / "b0", seed=0)


@pytest.fixture(scope="session")
def bundle2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second bundle in the same schema and entity space (another model version)."""
    return make_fake_bundle(tmp_path_factory.mktemp("bundle") / "b1", seed=1)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", bundle_dir)


def _redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.exceptions.RedisError:
        return False


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix in the test DB; its keys (and only they) are deleted afterwards."""
    import redis

    if not _redis_available():
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"unimatch-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """A TCP proxy to the real Redis that a test can cut and restore (the shared Redis is never stopped)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.delay_s = 0.0  # added before forwarding each reply chunk: a slow Redis

    async def _pipe_back(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe_back(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self.stop()
        asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    from redis.connection import parse_url

    where = parse_url(REDIS_URL)
    proxy = TcpProxy(where.get("host", "127.0.0.1"), int(where.get("port", 6379)))
    proxy.start()
    yield proxy
    proxy.close()


def redis_db() -> int:
    from redis.connection import parse_url

    return int(parse_url(REDIS_URL).get("db", 0))
