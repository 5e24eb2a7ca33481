"""Start-up and shutdown of the service's heavy objects (FastAPI "Lifespan Events").

Everything expensive is created here and kept on ``app.state.unimatch`` (a
:class:`~service.state.ServiceState`): the memory-mapped bundle and its
:class:`~service.engine.MatchEngine` (wrapped in an immutable :class:`~service.loading.Serving`), the
feature store with its bounded Redis pool, and the scoring thread pool. Reload lives in
``service.state``, loading a bundle in ``service.loading``.

"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from service import bundle_watch, metrics
from service.admission import Admission, Headroom, ServiceTimes
from service.config import Settings
from service.cpus import cpu_budget
from service.features import (
    EmbeddedFeatureStore,
    FeatureStore,
    NullFeatureStore,
    RedisFeatureStore,
)
from service.loading import Serving, build_serving, check_store_matches, freeze_heap, seed_admission
from service.shadow import ShadowMonitor
from service.state import ConcurrencyLimiter, ServiceState

log = logging.getLogger("unimatch.service")


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
        admission=Admission(threads=settings.effective_scoring_threads, retry_after_s=settings.retry_after_s,
                            times=ServiceTimes(upper_q=settings.admission_quantile),
                            headroom=Headroom(target=settings.admission_partial_target,
                                              ceiling=settings.admission_ceiling)),
        shadow=ShadowMonitor(rate=settings.shadow_rate, queue_size=settings.shadow_queue,
                             cpu_share=settings.shadow_cpu_share, yield_to_requests=settings.shadow_yield,
                             spare_cpus=settings.shadow_spare_cpus)
        if settings.shadow_rate > 0 else None,
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
    freeze_heap()
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
