"""What the routes reach through ``service.deps``: the serving bundle, the store, the pools, and reload.

Hot reload (``POST /admin/reload``): the new bundle is loaded, checksummed, schema-checked and warmed
in a background thread while the old one keeps serving; then ``state.serving`` is re-bound in one
assignment. A request holds the ``Serving`` it started with, so in-flight requests finish on the old
bundle and the old engine is freed when the last of them returns. Anything failing leaves the old
bundle in place and the failure in ``/readyz`` and ``unimatch_reloads_total{outcome="failed"}``.

With several uvicorn workers, the admin request reaches one process only; it also writes the target
to ``UNIMATCH_CONTROL_DIR/reload.json`` and every worker polls that file, so all of them reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import metrics
from service.admission import Admission
from service.config import Settings
from service.errors import Overloaded, ReloadBusy, ReloadFailed
from service.features import FeatureStore
from service.loading import Serving, build_serving, check_store_matches, freeze_heap, seed_admission
from service.shadow import ShadowMonitor

log = logging.getLogger("unimatch.service")


@dataclass
class ConcurrencyLimiter:
    """Admits at most ``limit`` requests at once; the next one is refused at once (503), never queued.

    Only touched from the event loop thread, so a plain counter is race-free.
    """

    limit: int
    retry_after_s: int
    in_flight: int = 0

    batch_share: float = 0.25  # the most of the limit one batch may hold

    @property
    def fair_share(self) -> int:
        """Slots one /match/batch may hold at most, so single requests keep being admitted beside it."""
        return max(1, int(self.limit * self.batch_share))

    @contextlib.contextmanager
    def slot(self, n: int = 1) -> Iterator[None]:
        """Hold ``n`` slots (a batch holds one per user, capped at its fair share of the limit)."""
        n = max(1, min(n, self.fair_share if n > 1 else self.limit))
        if self.in_flight + n > self.limit:
            raise Overloaded(
                f"{self.in_flight} requests in flight (limit {self.limit}); retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.in_flight += n
        metrics.IN_FLIGHT.inc(n)
        try:
            yield
        finally:
            self.in_flight -= n
            metrics.IN_FLIGHT.dec(n)


@dataclass
class ReloadState:
    state: str = "idle"
    target: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class ServiceState:
    """What the routes reach through ``service.deps``."""

    settings: Settings
    store: FeatureStore
    executor: ThreadPoolExecutor
    limiter: ConcurrencyLimiter
    admission: Admission
    serving: Serving | None = None
    shadow: ShadowMonitor | None = None  # live search-quality monitor (UNIMATCH_SHADOW_RATE > 0)
    reload: ReloadState = field(default_factory=ReloadState)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _control_nonce: str | None = None

    # ---- reload ----------------------------------------------------------------------------------
    async def reload_bundle(self, target: Path, *, wait: bool, broadcast: bool = True) -> ReloadState:
        """Start (or, with ``wait``, run to completion) a reload to ``target``; one at a time."""
        if self._reload_lock.locked():
            raise ReloadBusy(f"a reload to {self.reload.target} is in progress")
        await self._reload_lock.acquire()
        self.reload = ReloadState(state="loading", target=str(target), started_at=time.time())
        if broadcast:
            self._broadcast(target)
        task = asyncio.create_task(self._reload(target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if wait:
            await asyncio.shield(task)
            if self.reload.state == "failed":
                raise ReloadFailed(f"bundle {target} refused, still serving {self.serving_version}: {self.reload.error}")
        return self.reload

    @property
    def serving_version(self) -> str | None:
        return self.serving.version if self.serving is not None else None

    async def _reload(self, target: Path) -> None:
        new: Serving | None = None
        try:
            new = await asyncio.to_thread(build_serving, target, self.settings)
            await self._check_features(new)
        except Exception as exc:  # any failure refuses the bundle; the old one keeps serving
            if new is not None and new.changes is not None:  # a refused bundle does not keep following its log
                await asyncio.to_thread(new.changes.stop)
            log.error("reload to %s refused: %s", target, exc)
            metrics.RELOADS.labels(outcome="failed").inc()
            self.reload = dataclasses.replace(self.reload, state="failed", error=str(exc), finished_at=time.time())
        else:
            old = self.serving
            self.serving = new  # the atomic swap: new requests see the new bundle from here on
            seed_admission(self.admission, new)
            previous = (old.version, old.method) if old is not None else None
            metrics.set_bundle(new.version, new.method, previous)
            metrics.RELOADS.labels(outcome="succeeded").inc()
            log.info("now serving bundle %s (was %s)", new.version, previous[0] if previous else None)
            if old is not None:
                self.spawn(self._retire(old))
            self.reload = dataclasses.replace(self.reload, state="succeeded", finished_at=time.time())
        finally:
            self._reload_lock.release()

    async def _retire(self, old: Serving) -> None:
        """Release the replaced engine's background resources (the batcher thread) once the requests
        that started on it are over: a request never outlives its deadline by more than one step."""
        await asyncio.sleep(max(5.0, 2 * self.settings.deadline_ms / 1e3))
        if old.changes is not None:
            await asyncio.to_thread(old.changes.stop)
        await asyncio.to_thread(old.engine.close)
        del old
        freeze_heap(collect=False)  # the new bundle's objects out of the collector's reach

    async def _check_features(self, new: Serving) -> None:
        """Refuse a bundle whose schema or entity rows do not match the features the store holds."""
        await check_store_matches(self.store, new, startup=False)

    # ---- multi-worker control file ---------------------------------------------------------------
    def _control_file(self) -> Path | None:
        d = self.settings.control_dir
        return d / "reload.json" if d is not None else None

    def _broadcast(self, target: Path) -> None:
        path = self._control_file()
        if path is None:
            return
        nonce = uuid.uuid4().hex
        self._control_nonce = nonce
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bundle": str(target), "nonce": nonce}))
        os.replace(tmp, path)

    async def watch_control(self) -> None:
        """Poll the control file; a nonce this worker has not seen triggers the same reload here."""
        path = self._control_file()
        if path is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._control_nonce = json.loads(path.read_text()).get("nonce")  # only changes after start count
        while True:
            await asyncio.sleep(self.settings.control_poll_s)
            try:
                order = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            nonce = order.get("nonce")
            if nonce and nonce != self._control_nonce and not self._reload_lock.locked():
                self._control_nonce = nonce
                log.info("reload ordered through %s", path)
                with contextlib.suppress(ReloadBusy):
                    await self.reload_bundle(Path(order["bundle"]), wait=False, broadcast=False)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # In-flight requests have finished (uvicorn drains them before the lifespan ends).
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.shadow is not None:
            self.shadow.close()
        if self.serving is not None:
            if self.serving.changes is not None:
                self.serving.changes.stop()
            self.serving.engine.close()
        await self.store.close()


