"""Start-up, hot reload and shutdown of the service's heavy objects (FastAPI "Lifespan Events").

Everything expensive is created here and kept on ``app.state.unimatch`` (a :class:`ServiceState`):
the memory-mapped bundle and its :class:`~service.engine.MatchEngine` (wrapped in an immutable
:class:`Serving`), the feature store with its bounded Redis pool, and the scoring thread pool.

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
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from service import bundle_watch, metrics
from service.admission import Admission
from service.config import Settings
from service.cpus import cpu_budget
from service.errors import Overloaded, ReloadBusy, ReloadFailed
from service.features import (
    EmbeddedFeatureStore,
    FeatureStore,
    NullFeatureStore,
    RedisFeatureStore,
    entity_space_fingerprint,
)
from service.shadow import ShadowMonitor

if TYPE_CHECKING:
    from model.data.schema import FeatureSchema
    from service.bundle import Bundle
    from service.changes import ChangeFollower
    from service.engine import MatchEngine, SearchParams

log = logging.getLogger("unimatch.service")


@dataclass(frozen=True)
class Serving:
    """One loaded, verified and warmed bundle. Immutable: a reload builds a new one and swaps it in."""

    bundle: Bundle
    engine: MatchEngine
    entity_space: str
    loaded_at: float
    warm_times: dict[int, float] = field(default_factory=dict)  # k -> seconds of one warm-up search
    changes: ChangeFollower | None = None  # live catalogue: this bundle's change log, followed (UNIMATCH_LIVE_CHANGES)

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def schema(self) -> FeatureSchema:
        return self.bundle.schema

    @property
    def method(self) -> str:
        return str(self.bundle.manifest.get("method", "unknown"))


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


# ---- builders ------------------------------------------------------------------------------------
def search_params(settings: Settings) -> SearchParams | None:
    """Engine search parameters from settings; None keeps the engine's defaults."""
    from service.engine import SearchParams

    given: dict[str, Any] = {
        "ef": settings.search_ef,
        "steps": settings.search_steps,
        "top_n": settings.search_top_n,
        "max_degree": settings.search_max_degree,
        "exhaustive_threshold": settings.search_exhaustive_threshold,
        "whole_top_layer_up_to": settings.search_whole_top_layer_up_to,
    }
    given = {name: v for name, v in given.items() if v is not None}
    if not given:
        return None
    return dataclasses.replace(SearchParams(), **given)


def providers(settings: Settings) -> list[str] | None:
    return {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "auto": None,
    }[settings.providers]


def build_serving(path: Path, settings: Settings) -> Serving:
    """Load (memory-mapped), verify, and warm a bundle. Blocking: call it from a thread."""
    from service.bundle import load_bundle
    from service.engine import MatchEngine

    t0 = time.perf_counter()
    bundle = load_bundle(Path(path), verify_checksums=settings.verify_checksums)
    params = search_params(settings)
    engine = MatchEngine(
        bundle,
        params=params,
        intra_op_threads=settings.intra_op_threads,
        providers=providers(settings),
        batch_requests=settings.batch_requests,
        use_calibration=settings.search_calibration and params is None,
        live_capacity=settings.live_capacity if settings.live_changes else 0,
        live_ef_construction=settings.live_ef_construction,
    )
    changes = follow_changes(engine, settings) if settings.live_changes else None
    log_calibration(engine)
    t_warm = time.perf_counter()
    engine.warmup()
    warm_times = {10: (time.perf_counter() - t_warm) / max(1, len(bundle.schema.domains))}
    warm_times.update(warm_at_max_k(engine, settings.max_k))
    bundle.row_of("")  # builds the id -> row index now, not inside the first request with `exclude`
    # A compacted bundle appends rows; user histories hold rows of the bundle they were loaded for, which
    # the compaction kept in place: the feature store is checked against those rows only.
    feature_rows = int((bundle.manifest.get("live") or {}).get("feature_rows", bundle.num_entities))
    serving = Serving(
        bundle=bundle, engine=engine, entity_space=entity_space_fingerprint(bundle.entity_ids[:feature_rows]),
        loaded_at=time.time(), warm_times=warm_times, changes=changes,
    )
    if changes is not None:
        changes.start()
    log.info("bundle %s loaded and warmed in %.2f s (%s)", bundle.version, time.perf_counter() - t0, engine.provider)
    return serving


def follow_changes(engine: MatchEngine, settings: Settings) -> ChangeFollower:
    """Open the bundle lineage's change log and replay it into the engine's live catalogue (blocking)."""
    from service.changes import ChangeFollower, ChangeLog, stream_key

    live = engine.live
    if live is None or not settings.redis_url:
        raise RuntimeError("live changes need the live catalogue and a Redis URL")
    changes = ChangeLog.from_url(settings.redis_url, stream_key(settings.redis_key_prefix + ":", live.lineage))
    follower = ChangeFollower(changes, live, poll_s=settings.live_poll_s)
    t0, start = time.perf_counter(), live.position
    n = follower.replay()  # a (re)started worker serves only once it holds every acknowledged change
    log.info("live changes: log %s replayed after %s up to %s: %d entries in %.2f s, %d overlay rows",
             changes.key, start, live.position, n, time.perf_counter() - t0, live.count)
    metrics.set_live(live)
    return follower


def log_calibration(engine: MatchEngine) -> None:
    """Say at start-up which search each domain gets and how well it was measured to do."""
    info = engine.info()
    cal = engine.calibration
    if cal is None:
        log.info("search: %s; default parameters %s", info["calibration_note"], info["search_params"])
        return
    from service.shadow import k_bucket

    for domain, points in cal.domains.items():
        for p in points:  # the live monitor's yardstick, there from start-up for the alert rule
            if p.mode == "graph":
                metrics.CALIBRATED_COVERAGE.labels(domain=domain, k_bucket=k_bucket(p.k)).set(p.coverage)
        parts = [
            f"k<={p.k} {p.mode}" + (f" ef={'/'.join(map(str, p.ef))} T={'/'.join(map(str, p.steps))}"
                                    f"{' +history' if p.seed_history else ''}" if p.mode == "graph" else "")
            + f" coverage {p.coverage:.4f}±{p.coverage_ci95:.4f} {p.pairs:.0f} pairs"
            for p in points
        ]
        log.info("search calibrated (target %.3f, %d queries) domain %s: %s", cal.target, cal.queries, domain, "; ".join(parts))


def seed_admission(admission: Admission, serving: Serving) -> None:
    """Start the admission's service-time estimate from the warm-up searches (where nothing was measured)."""
    for k, seconds in serving.warm_times.items():
        admission.seed(k, seconds)


def warm_at_max_k(engine: MatchEngine, max_k: int) -> dict[int, float]:
    """One cold-start search per domain at the largest k a request may ask for, with no deadline.

    The engine's own warm-up uses k=10, which walks only the graph near the entry points: a bundle that
    fails only on wide searches (corrupted neighbour lists once broke every k >= 500) passed it and
    then failed live traffic. An exception here refuses the bundle at load and reload.
    """
    from service.engine import UserFeatures

    user = UserFeatures.cold_start(engine.bundle.schema)
    eligible: dict[str, int] = engine.info()["eligible_per_domain"]
    times: dict[int, float] = {}
    for d, name in enumerate(engine.bundle.schema.domains):
        k = min(max_k, int(eligible.get(name, 0)))
        if k > 0:
            t0 = time.perf_counter()
            engine.match(user, d, k)
            times[k] = max(times.get(k, 0.0), time.perf_counter() - t0)
    return times  # k -> seconds of the slowest domain: seeds the admission estimate


async def check_store_matches(store: FeatureStore, serving: Serving, *, startup: bool) -> None:
    """The store's features must be encoded for this bundle's schema and entity rows.

    Embedded store: a mismatch is always fatal (it can only ever serve its dataset). Redis: a schema
    nobody loaded features for, or features loaded against another entity order, is refused on
    reload; at start-up it is logged (features may be loaded after the service starts).
    """
    health = await store.health(serving.schema)
    problem: str | None = None
    if isinstance(store, EmbeddedFeatureStore):
        if store.fingerprint != serving.schema.fingerprint():
            problem = f"dataset schema {store.fingerprint} differs from the bundle's {serving.schema.fingerprint()}"
        elif store.entity_space != serving.entity_space:
            problem = "the dataset's entities are not in the bundle's row order"
        if problem:
            raise ReloadFailed(f"embedded feature store ({store.root}): {problem}")
        return
    if store.kind != "redis" or health.get("status") not in ("ok", "empty"):
        return
    if not health.get("loaded"):
        problem = f"no features loaded in Redis for schema {serving.schema.fingerprint()} (run `unimatch features load`)"
    elif health.get("entity_space") != serving.entity_space:
        problem = "Redis features were loaded against another entity row order"
    if problem:
        if startup:
            log.warning("feature store: %s", problem)
        else:
            raise ReloadFailed(problem)


def ordered_bundle(settings: Settings) -> Path | None:
    """The bundle the last multi-worker reload ordered (``UNIMATCH_CONTROL_DIR/reload.json``), if any."""
    if settings.control_dir is None:
        return None
    try:
        order = json.loads((settings.control_dir / "reload.json").read_text())
        return Path(order["bundle"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_store(settings: Settings) -> FeatureStore:
    if settings.redis_url:
        store: FeatureStore = RedisFeatureStore(
            url=settings.redis_url,
            prefix=settings.redis_key_prefix,
            pool_size=settings.redis_pool_size,
            timeout_s=settings.redis_timeout_s,
            retry_interval_s=settings.redis_retry_interval_s,
            on_result=metrics.observe_redis,
        )
        log.info("feature store: redis %s", store.describe()["redis"])
        return store
    if settings.data is not None:
        log.info("feature store: embedded, from dataset %s (no UNIMATCH_REDIS_URL)", settings.data)
        return EmbeddedFeatureStore(settings.data)
    log.warning("feature store: none configured (no UNIMATCH_REDIS_URL, no UNIMATCH_DATA): every user is cold start")
    return NullFeatureStore()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if not logging.getLogger().handlers:  # uvicorn workers configure only uvicorn's own loggers
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.bundle is None:
        raise RuntimeError("no bundle to serve: set UNIMATCH_BUNDLE or pass --bundle")
    if settings.oversubscribed:
        log.warning(
            "workers x scoring_threads x intra_op_threads = %d x %d x %d exceeds %d cores",
            settings.workers, settings.effective_scoring_threads, settings.intra_op_threads, settings.cores,
        )
    budget = cpu_budget()
    log.info(
        "cpus: %d (%s, quota %s); scoring threads per worker: %d",
        budget.cpus, budget.source, budget.quota, settings.effective_scoring_threads,
    )
    t0 = time.perf_counter()
    # The Redis client binds to this event loop; only the embedded store (reads a dataset) needs a thread.
    store = build_store(settings) if settings.redis_url else await asyncio.to_thread(build_store, settings)
    state = ServiceState(
        settings=settings,
        store=store,
        executor=ThreadPoolExecutor(max_workers=settings.effective_scoring_threads, thread_name_prefix="unimatch-score"),
        limiter=ConcurrencyLimiter(settings.max_concurrency, settings.retry_after_s, batch_share=settings.batch_share),
        admission=Admission(threads=settings.effective_scoring_threads, retry_after_s=settings.retry_after_s),
        shadow=ShadowMonitor(rate=settings.shadow_rate, queue_size=settings.shadow_queue,
                             cpu_share=settings.shadow_cpu_share) if settings.shadow_rate > 0 else None,
    )
    # A worker (re)started after a reload must serve what the others serve, not the bundle it was launched with.
    target = ordered_bundle(settings) or settings.bundle
    if settings.bundle_watch:  # load what the pointer names now, so a swap mid-load cannot mix versions
        target = target.resolve()
    serving: Serving | None = None
    try:
        serving = await asyncio.to_thread(build_serving, target, settings)
        await check_store_matches(store, serving, startup=True)
    except BaseException:
        if serving is not None and serving.changes is not None:
            serving.changes.stop()
        await state.aclose()
        raise
    state.serving = serving
    seed_admission(state.admission, serving)
    metrics.set_bundle(serving.version, serving.method)
    app.state.unimatch = state
    state.spawn(state.watch_control())
    if settings.bundle_watch:
        poll, stagger = settings.bundle_watch_poll_s, settings.bundle_watch_stagger_s
        state.spawn(bundle_watch.watch(state, settings.bundle, poll_s=poll, stagger_s=stagger))
    log.info("ready in %.2f s: bundle %s, features %s", time.perf_counter() - t0, serving.version, store.kind)
    try:
        yield
    finally:
        log.info("shutting down: closing the scoring pool and the feature store")
        await state.aclose()
        metrics.mark_process_dead(os.getpid())
