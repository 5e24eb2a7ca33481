"""``POST /match`` and ``POST /match/batch``: user in, top-k entities out (paper section IV-C).

HTTP in and out, nothing else; one request reads in one direction:
names -> indices through the bundle's vocabulary (``prepare``) -> admission -> the user's features (one
Redis round trip, or the embedded store) with the request's overrides (``service.overrides``) ->
``engine.query`` (the one validation, ``SearchError`` -> 422 at the edge) -> ``engine.run`` in the
scoring pool, never on the event loop -> rows -> entity ids (``answer``), metrics
(``metrics.record_match``). The ``Serving`` taken at the start is used throughout, so a hot reload
never mixes two bundles in one answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request

from contracts.features import UserFeatures
from service import metrics
from service.admission import Ticket
from service.deps import ServingDep, StateDep
from service.errors import ARRIVED_KEY, InvalidRequest
from service.features import Lookup
from service.loading import Serving
from service.overrides import apply_overrides
from service.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    MatchItem,
    MatchRequest,
    MatchResponse,
    MatchStats,
)
from service.state import ServiceState
from service.vocabulary import rows_of

if TYPE_CHECKING:
    from service.engine import MatchResult

router = APIRouter(tags=["match"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "invalid request (unknown domain, k above the maximum, ...)"},
    413: {"model": ErrorResponse, "description": "body larger than UNIMATCH_MAX_BODY_BYTES"},
    503: {"model": ErrorResponse, "description": "overloaded (see Retry-After) or not ready"},
}


@dataclass(frozen=True)
class Prepared:
    """A request's names resolved against the bundle (the engine validates the rest, once)."""

    body: MatchRequest
    request_id: str
    domain: int
    k: int
    exclude_rows: np.ndarray | None
    entity_types: list[int] | None
    deadline: float  # time.monotonic() by which the search must stop
    probe: bool = False  # admitted as an admission-control probe: runs even if it cannot finish in time
    admitted: float = 0.0  # time.monotonic() when admission let it in (0: not through admission)
    # the caller chose a deadline below the service's: its answer does not feed admission's headroom
    own_deadline: bool = False


def prepare(body: MatchRequest, serving: Serving, state: ServiceState, arrived: float) -> Prepared:
    """The service's limits and the bundle's names; raises InvalidRequest with a clear message."""
    settings = state.settings
    vocab = serving.vocab
    if body.k > settings.max_k:
        raise InvalidRequest(f"k={body.k} exceeds the maximum {settings.max_k} (UNIMATCH_MAX_K)")
    domain = vocab.domains.get(body.domain)
    if domain is None:
        raise InvalidRequest(f"unknown domain {body.domain!r}; expected one of {list(vocab.domains)}")
    if len(body.exclude) > settings.max_exclude:
        raise InvalidRequest(f"exclude has {len(body.exclude)} ids; at most {settings.max_exclude}")
    types: list[int] | None = None
    if body.entity_types is not None:
        unknown = sorted(set(body.entity_types) - set(vocab.entity_types))
        if unknown:
            raise InvalidRequest(f"unknown entity types {unknown}; expected a subset of {list(vocab.entity_types)}")
        types = [vocab.entity_types[t] for t in body.entity_types]
    # unknown ids: nothing to drop; the engine's map includes entities upserted online
    rows, _ = rows_of(serving.engine.row_of, body.exclude)
    budget_s = settings.deadline_ms / 1e3
    if body.deadline_ms is not None:
        budget_s = min(budget_s, body.deadline_ms / 1e3)
    return Prepared(
        body=body,
        request_id=body.request_id or uuid.uuid4().hex,
        domain=domain,
        k=body.k,
        exclude_rows=rows if rows.size else None,
        entity_types=types,
        deadline=arrived + budget_s,
    )


async def run_match(
    state: ServiceState, serving: Serving, prep: Prepared, lookup: Lookup, arrived: float, ticket: Ticket | None = None,
) -> MatchResponse:
    """Features with overrides -> validated query -> search in the scoring pool -> the HTTP answer."""
    engine = serving.engine
    stored = lookup.features if lookup.features is not None else UserFeatures.cold_start(serving.schema)
    features, unknown_ids = apply_overrides(stored, prep.body.features, serving.vocab, serving.bundle)
    # The answer is done when the event loop has resumed this request, not when the search returns:
    # the search stops early enough to leave the usual hand-back time inside the deadline.
    search_deadline = prep.deadline - state.admission.reserve_s(prep.deadline - arrived)
    query = engine.query(features, prep.domain, prep.k, exclude_rows=prep.exclude_rows,
                         entity_types=prep.entity_types, deadline=search_deadline)
    # through admission: the unit counts as pending work, and is refused in the pool thread when its
    # wait for a thread left less of the deadline than a search takes (service/admission.py)
    timing: dict[str, float] = {}
    result = await state.admission.run(state.executor, lambda: engine.run(query), k=prep.k, deadline=search_deadline,
                                       probe=prep.probe, timing=timing, ticket=ticket)
    resumed = time.monotonic()
    state.admission.observe_handoff(resumed - timing["ended"])
    if not prep.own_deadline and not prep.probe and "probe" not in timing:
        state.admission.observe_outcome(bool(result.partial))  # the AIMD headroom (service/admission.py)
    timing["resumed"] = resumed
    total_s = resumed - arrived
    if state.shadow is not None:  # a random draw and a non-blocking put: never delays this answer
        state.shadow.offer(engine, prep.domain, prep.k, features, result, exclude_rows=prep.exclude_rows,
                           entity_types=prep.entity_types)
    response = answer(prep, serving, lookup, result, arrived=arrived, timing=timing, unknown_ids=unknown_ids)
    metrics.record_match(response, lookup, total_s)
    return response


def answer(
    prep: Prepared, serving: Serving, lookup: Lookup, result: MatchResult, *, arrived: float, timing: dict[str, float],
    unknown_ids: int,
) -> MatchResponse:
    """The engine's rows and stats as the HTTP answer: entity ids and type names, best first, and where
    the time went (``timing``: admission's submitted/started/ended/runqueue stamps, and resumed)."""
    total_s = timing["resumed"] - arrived
    engine = serving.engine
    rows = np.asarray(result.rows, dtype=np.int64)
    type_codes = engine.types_of(rows).tolist() if rows.size else []
    ids = engine.ids_of(rows) if rows.size else []
    type_names = serving.vocab.type_names
    items = [
        MatchItem(entity_id=str(eid), entity_type=type_names[int(t)], score=float(s))
        for eid, t, s in zip(ids, type_codes, np.asarray(result.scores).tolist(), strict=True)
    ]
    st = result.stats
    cold_start = lookup.features is None
    stats = MatchStats(
        pair_evaluations=st.pair_evaluations,
        mode=str(result.mode),
        feature_source=lookup.source if not cold_start else "cold_start",
        features_ms=round(lookup.seconds * 1e3, 3),
        user_encode_ms=round(st.user_encode_ms, 3),
        search_ms=round(st.search_ms, 3),
        scorer_ms=round(st.scorer_ms, 3),
        total_ms=round(total_s * 1e3, 3),
        steps=st.steps,
        unknown_override_ids=unknown_ids,
        admitted_ms=round((prep.admitted - arrived) * 1e3, 3) if prep.admitted else 0.0,
        submitted_ms=round((timing["submitted"] - arrived) * 1e3, 3),
        queue_ms=round((timing["started"] - timing["submitted"]) * 1e3, 3),
        handoff_ms=round((timing["resumed"] - timing["ended"]) * 1e3, 3),
        runqueue_ms=round(timing.get("runqueue", 0.0) * 1e3, 3),
    )
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


def own_budget(body: MatchRequest, state: ServiceState, prep: Prepared, arrived: float) -> float | None:
    """The budget the caller chose itself (``deadline_ms`` below the service's), else None.

    Admission answers (``partial``) rather than refuses a request whose *own* short deadline no search
    could meet: the caller's choice. The service's deadline is not a choice to honour that way: when the
    host is so starved that the mean search takes longer than it, answering everything would admit
    requests that waited a second for the event loop and answer them with nothing.
    """
    if body.deadline_ms is None or body.deadline_ms >= state.settings.deadline_ms:
        return None
    return prep.deadline - arrived


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
        state.admission.observe_sojourn(time.monotonic() - arrived, prep.k)
        own = own_budget(body, state, prep, arrived)
        # the admitted search counts as queued work from here, through its feature read (service/admission.py)
        ticket = state.admission.admit_ticket(prep.k, prep.deadline, budget_s=own, whole_s=prep.deadline - arrived)
        try:
            prep = dataclasses.replace(prep, probe=ticket.probe, admitted=time.monotonic(), own_deadline=own is not None)
            lookup = await state.store.get(body.user_id, serving.schema)
            return await run_match(state, serving, prep, lookup, arrived, ticket)
        finally:
            ticket.release()


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
        state.admission.observe_sojourn(time.monotonic() - arrived, max(p.k for p in preps))
        own = own_budget(first.body, state, first, arrived)
        ticket = state.admission.admit_ticket(max(p.k for p in preps), first.deadline, units=n, budget_s=own,
                                              whole_s=first.deadline - arrived)
        try:
            preps = [dataclasses.replace(p, probe=ticket.probe, own_deadline=own is not None) for p in preps]
            lookups = await state.store.get_many([p.body.user_id for p in preps], serving.schema)
            gate = asyncio.Semaphore(max(1, min(n, state.admission.threads // 2)))

            async def one(prep: Prepared, lookup: Lookup) -> MatchResponse:
                async with gate:
                    started = time.monotonic()
                    own = dataclasses.replace(prep, deadline=started + (prep.deadline - arrived))
                    return await run_match(state, serving, own, lookup, started, ticket)

            results = await asyncio.gather(*(one(p, lk) for p, lk in zip(preps, lookups, strict=True)))
            return BatchResponse(results=list(results))
        finally:
            ticket.release()
