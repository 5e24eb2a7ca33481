"""Loading one bundle into a ``Serving``: verified, engine built, warmed, ready to swap in.

Used at start-up (``service.lifespan``) and by every hot reload (``service.state.ServiceState``); all
of it is per-bundle work done once, off the request path: the memory maps and checksums, the engine and
its calibrated operating points, the warm-up at the largest k, the request vocabulary.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import metrics
from service.admission import Admission
from service.config import Settings
from service.errors import ReloadFailed
from service.features import EmbeddedFeatureStore, FeatureStore, entity_space_fingerprint
from service.vocabulary import Vocabulary

if TYPE_CHECKING:
    from contracts.bundle import Bundle
    from contracts.schema import FeatureSchema
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
    vocab: Vocabulary  # the request names of this bundle, resolved to indices once
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
    from contracts.bundle import load_bundle
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
        huge_pages=settings.huge_pages,
    )
    changes = follow_changes(engine, settings) if settings.live_changes else None
    if settings.live_changes:
        engine.yield_live_changes(settings.live_apply_yield_s)  # after the replay: nothing to yield to before
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
        loaded_at=time.time(), vocab=Vocabulary.of(bundle), warm_times=warm_times, changes=changes,
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
    follower = ChangeFollower(changes, live, poll_s=settings.live_poll_s, priority=settings.live_apply_priority,
                              ack_timeout_s=settings.live_ack_timeout_s)
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


def freeze_heap(*, collect: bool = True) -> None:
    """Move every object alive (the bundle, the ONNX sessions, the imported modules: ~70,000 objects)
    out of the cyclic collector's reach (``gc.freeze``), after one collection if ``collect``.

    A full collection walks every tracked object while holding the GIL: measured at 100-140 ms on the
    shared 2-core machine, a stop of the whole worker, every in-flight search included, each time the
    allocations of requests (a k=500 answer builds 500 items) trigger one. Frozen, the long-lived
    objects are never scanned again; requests' garbage is still collected, in young generations.

    At start-up (nothing served yet) it collects first. After a reload it only freezes what the new
    bundle added: a collection then would be that same stop in the middle of serving (measured: a 503
    during a rollout under load), and it is not needed: the old bundle's serving objects hold no
    reference cycles (checked: its Serving, engine, bundle and scorer are freed by reference counting
    alone, with the collector disabled), so they are released although they were frozen.
    """
    if collect:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


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
    from contracts.features import UserFeatures

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


