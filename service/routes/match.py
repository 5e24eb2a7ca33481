"""``POST /match`` and ``POST /match/batch``: user in, top-k entities out (paper section IV-C).

One request, in order: validate against the loaded bundle (domain, k, entity types, excluded ids) ->
fetch the user's features (one Redis round trip, or the embedded store) and apply inline overrides ->
run the engine (user encoder + beam search with the pair scorer) in the scoring thread pool, never on
the event loop -> map rows to entity ids, record metrics. The ``Serving`` taken at the start is used
throughout, so a hot reload never mixes two bundles in one answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request

from service import metrics
from service.deps import ServingDep, StateDep
from service.errors import ARRIVED_KEY, InvalidRequest
from service.features import PAD, Lookup
from service.lifespan import ServiceState, Serving
from service.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    MatchItem,
    MatchRequest,
    MatchResponse,
    MatchStats,
)

if TYPE_CHECKING:
    from service.engine import MatchResult, UserFeatures

router = APIRouter(tags=["match"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "invalid request (unknown domain, k above the maximum, ...)"},
    413: {"model": ErrorResponse, "description": "body larger than UNIMATCH_MAX_BODY_BYTES"},
    503: {"model": ErrorResponse, "description": "overloaded (see Retry-After) or not ready"},
}


# Lookup.error -> the cause label of unimatch_degraded_answers_total: "slow" and "down" apart (issue 20).
_DEGRADED_CAUSE = {
    "timeout": "slow",
    "connection": "down",
    "redis": "down",
    "skipped": "breaker_open",
    "decode": "decode",
    "empty_store": "empty_store",
}


@dataclass(frozen=True)
class Prepared:
    """A request checked against the bundle, ready for the engine."""

    body: MatchRequest
    request_id: str
    domain: int
    k: int
    exclude_rows: np.ndarray | None
    entity_types: list[int] | None
    deadline: float  # time.monotonic() by which the search must stop
    probe: bool = False  # admitted as an admission-control probe: runs even if it cannot finish in time


def prepare(body: MatchRequest, serving: Serving, state: ServiceState, arrived: float) -> Prepared:
    """Check a request against the limits and the bundle; raises InvalidRequest with a clear message."""
    settings = state.settings
    schema = serving.schema
    if body.k > settings.max_k:
        raise InvalidRequest(f"k={body.k} exceeds the maximum {settings.max_k} (UNIMATCH_MAX_K)")
    if body.domain not in schema.domains:
        raise InvalidRequest(f"unknown domain {body.domain!r}; expected one of {schema.domains}")
    if len(body.exclude) > settings.max_exclude:
        raise InvalidRequest(f"exclude has {len(body.exclude)} ids; at most {settings.max_exclude}")
    types: list[int] | None = None
    if body.entity_types is not None:
        unknown = sorted(set(body.entity_types) - set(schema.entity_types))
        if unknown:
            raise InvalidRequest(f"unknown entity types {unknown}; expected a subset of {schema.entity_types}")
        types = sorted({schema.entity_types.index(t) for t in body.entity_types})
        if not types:
            raise InvalidRequest("entity_types is empty: nothing could be returned")
    # unknown ids: nothing to drop; the engine's map includes entities upserted online
    rows = [r for r in (serving.engine.row_of(e) for e in body.exclude) if r is not None]
    exclude = np.asarray(rows, dtype=np.int64) if rows else None
    budget_s = settings.deadline_ms / 1e3
    if body.deadline_ms is not None:
        budget_s = min(budget_s, body.deadline_ms / 1e3)
    return Prepared(
        body=body,
        request_id=body.request_id or uuid.uuid4().hex,
        domain=schema.domains.index(body.domain),
        k=body.k,
        exclude_rows=exclude,
        entity_types=types,
        deadline=arrived + budget_s,
    )


def user_features(prep: Prepared, lookup: Lookup, serving: Serving) -> tuple[UserFeatures, int]:
    """Stored features (or cold-start defaults) with the request's overrides applied.

    Returns the features and the number of override entity ids that are not in the catalogue (dropped).
    """
    from service.engine import UserFeatures

    schema = serving.schema
    if lookup.features is None:
        base = UserFeatures.cold_start(schema)
        cat, num, seq = base.cat, base.num, base.seq
    else:
        cat, num, seq = lookup.features.cat, lookup.features.num, lookup.features.seq
    over = prep.body.features
    unknown_ids = 0
    if over is not None:
        if over.categorical:
            cat = cat.copy()
            names = [c.name for c in schema.user_categorical]
            for name, code in over.categorical.items():
                if name not in names:
                    raise InvalidRequest(f"unknown categorical feature {name!r}; expected one of {names}")
                col = schema.user_categorical[names.index(name)]
                if not 0 <= code < col.cardinality:
                    raise InvalidRequest(f"feature {name!r}: code {code} outside [0, {col.cardinality})")
                cat[names.index(name)] = code
        if over.numeric:
            num = num.copy()
            names = [c.name for c in schema.user_numeric]
            for name, value in over.numeric.items():
                if name not in names:
                    raise InvalidRequest(f"unknown numeric feature {name!r}; expected one of {names}")
                if not math.isfinite(value):
                    raise InvalidRequest(f"feature {name!r}: value must be finite")
                num[names.index(name)] = value
        if over.sequence is not None or over.recent:
            history = seq[seq != PAD].tolist()
            if over.sequence is not None:
                history = []
                for e in over.sequence:
                    r = serving.bundle.row_of(e)
                    if r is None:
                        unknown_ids += 1
                    else:
                        history.append(r)
            for e in over.recent:
                r = serving.bundle.row_of(e)
                if r is None:
                    unknown_ids += 1
                else:
                    history.append(r)
            history = history[-schema.max_seq_len :]
            seq = np.full(schema.max_seq_len, PAD, dtype=np.int64)
            if history:
                seq[schema.max_seq_len - len(history) :] = history
    return UserFeatures(cat=np.asarray(cat, dtype=np.int64), num=np.asarray(num, dtype=np.float32), seq=seq), unknown_ids


async def run_match(state: ServiceState, serving: Serving, prep: Prepared, lookup: Lookup, arrived: float) -> MatchResponse:
    """Encode + search in the scoring pool, then build the response and record metrics."""
    features, unknown_ids = user_features(prep, lookup, serving)
    engine = serving.engine

    def _search() -> MatchResult:
        return engine.match(
            features,
            prep.domain,
            prep.k,
            exclude_rows=prep.exclude_rows,
            entity_types=prep.entity_types,
            deadline=prep.deadline,
        )

    from service.engine import SearchError

    try:
        # through admission: the unit counts as pending work, and is refused in the pool thread when its
        # wait for a thread left less of the deadline than a search takes (service/admission.py)
        result = await state.admission.run(state.executor, _search, k=prep.k, deadline=prep.deadline, probe=prep.probe)
    except SearchError as exc:
        raise InvalidRequest(str(exc)) from None
    total_s = time.monotonic() - arrived
    if state.shadow is not None:  # a random draw and a non-blocking put: never delays this answer
        state.shadow.offer(engine, prep.domain, prep.k, features, result, exclude_rows=prep.exclude_rows,
                           entity_types=prep.entity_types)
    rows = np.asarray(result.rows, dtype=np.int64)
    type_codes = engine.types_of(rows) if rows.size else np.empty(0, np.int16)
    ids = engine.ids_of(rows) if rows.size else []
    type_names = serving.schema.entity_types
    items = [
        MatchItem(entity_id=str(eid), entity_type=type_names[int(t)], score=float(s))
        for eid, t, s in zip(ids, type_codes.tolist(), np.asarray(result.scores).tolist(), strict=True)
    ]
    st = result.stats
    cold_start = lookup.features is None
    source = lookup.source if lookup.features is not None else "cold_start"
    stats = MatchStats(
        pair_evaluations=int(st.get("pair_evaluations", 0)),
        mode=str(result.mode),
        feature_source=source,
        features_ms=round(lookup.seconds * 1e3, 3),
        user_encode_ms=round(float(st.get("user_encode_ms", 0.0)), 3),
        search_ms=round(float(st.get("search_ms", 0.0)), 3),
        scorer_ms=round(float(st.get("scorer_ms", 0.0)), 3),
        total_ms=round(total_s * 1e3, 3),
        steps=int(st.get("steps", 0)),
        unknown_override_ids=unknown_ids,
    )
    # ---- metrics -------------------------------------------------------------------------------
    metrics.REQUEST_DURATION.labels(domain=prep.body.domain).observe(total_s)
    metrics.STAGE_DURATION.labels(stage="features").observe(lookup.seconds)
    metrics.STAGE_DURATION.labels(stage="user_encoding").observe(stats.user_encode_ms / 1e3)
    metrics.STAGE_DURATION.labels(stage="search").observe(stats.search_ms / 1e3)
    metrics.STAGE_DURATION.labels(stage="scorer").observe(stats.scorer_ms / 1e3)
    metrics.STAGE_DURATION.labels(stage="total").observe(total_s)
    metrics.PAIR_EVALUATIONS.observe(stats.pair_evaluations)
    if type_codes.size:
        counts = np.bincount(type_codes.astype(np.int64), minlength=len(type_names))
        for t, c in enumerate(counts.tolist()):
            if c:
                metrics.RESULTS.labels(entity_type=type_names[t]).inc(c)
    for flag, on in (("cold_start", cold_start), ("partial", bool(result.partial)), ("degraded", lookup.degraded)):
        if on:
            metrics.FLAGGED.labels(flag=flag).inc()
    if lookup.degraded:
        metrics.DEGRADED.labels(cause=_DEGRADED_CAUSE.get(lookup.error or "", "other")).inc()
    return MatchResponse(
        request_id=prep.request_id,
        bundle_version=serving.version,
        method=serving.method,
        domain=prep.body.domain,
        items=items,
        stats=stats,
        cold_start=cold_start,
        partial=bool(result.partial),
        degraded=lookup.degraded,
    )


def arrival(request: Request) -> float:
    """When the request reached the service (the edge middleware's stamp), so time spent before the
    route runs (accept, body read, event-loop lag under load) counts inside the deadline too."""
    stamp = request.scope.get(ARRIVED_KEY)
    return float(stamp) if isinstance(stamp, float) else time.monotonic()


@router.post("/match", response_model=MatchResponse, responses=_ERRORS, summary="Top-k entities for one user")
async def match(request: Request, body: MatchRequest, state: StateDep, serving: ServingDep) -> MatchResponse:
    arrived = arrival(request)
    with state.limiter.slot():
        prep = prepare(body, serving, state, arrived)
        # 503 now rather than a cut-short answer later
        probe = state.admission.admit(prep.k, prep.deadline, budget_s=prep.deadline - arrived)
        prep = dataclasses.replace(prep, probe=probe)
        lookup = await state.store.get(body.user_id, serving.schema)
        return await run_match(state, serving, prep, lookup, arrived)


@router.post("/match/batch", response_model=BatchResponse, responses=_ERRORS, summary="Top-k for several users")
async def match_batch(request: Request, body: BatchRequest, state: StateDep, serving: ServingDep) -> BatchResponse:
    """Several requests in one call: features in one round trip (MGET), then the searches.

    A batch holds one concurrency slot per entry up to its fair share of the limit, and runs its
    entries on at most half the scoring threads, so single requests are still served beside it. Each
    entry has its own deadline, counted from when that entry starts, so entries queued behind their
    siblings are not cut short; the whole batch takes about entries / (threads / 2) search times.
    """
    arrived = arrival(request)
    n = len(body.requests)
    if n > state.settings.max_batch:
        raise InvalidRequest(f"{n} requests; at most {state.settings.max_batch} (UNIMATCH_MAX_BATCH)")
    with state.limiter.slot(n):
        preps = []
        for i, req in enumerate(body.requests):
            try:
                preps.append(prepare(req, serving, state, arrived))
            except InvalidRequest as exc:
                raise InvalidRequest(f"requests[{i}]: {exc.message}") from None
        # the first entry must be able to start in time; later ones are checked as they start
        first = min(preps, key=lambda p: p.deadline)
        probe = state.admission.admit(max(p.k for p in preps), first.deadline, budget_s=first.deadline - arrived)
        preps = [dataclasses.replace(p, probe=probe) for p in preps]
        lookups = await state.store.get_many([p.body.user_id for p in preps], serving.schema)
        gate = asyncio.Semaphore(max(1, min(n, state.admission.threads // 2)))

        async def one(prep: Prepared, lookup: Lookup) -> MatchResponse:
            async with gate:
                started = time.monotonic()
                own = dataclasses.replace(prep, deadline=started + (prep.deadline - arrived))
                return await run_match(state, serving, own, lookup, started)

        results = await asyncio.gather(*(one(p, lk) for p, lk in zip(preps, lookups, strict=True)))
        return BatchResponse(results=list(results))
