"""``POST /admin/reload`` (and its status): hot-swap the serving bundle; ``POST /admin/entities[/{op}]``:
live catalogue changes (upsert, pause, resume, delete; service/live.py). Bearer token, else disabled (404).

The router is only mounted when ``UNIMATCH_ADMIN_TOKEN`` is set; ``require_admin`` checks again, so
a token removed from a running configuration can never leave the route open.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response

from service.deps import AdminDep, ServingDep, StateDep
from service.errors import InvalidRequest, NotReady
from service.loading import Serving
from service.schemas import ChangeAck, EntityIdsRequest, ErrorResponse, ReloadRequest, ReloadStatus, UpsertRequest

router = APIRouter(prefix="/admin", tags=["admin"])


def _status(state: StateDep) -> ReloadStatus:
    return ReloadStatus(**dataclasses.asdict(state.reload), bundle_version=state.serving_version)


@router.post(
    "/reload",
    response_model=ReloadStatus,
    status_code=202,
    responses={
        200: {"model": ReloadStatus, "description": "reloaded (wait=true)"},
        401: {"model": ErrorResponse},
        409: {"model": ErrorResponse, "description": "a reload is already running"},
        422: {"model": ErrorResponse, "description": "bundle refused (wait=true); the old one keeps serving"},
    },
    summary="Load, verify, warm and swap in a bundle; in-flight requests finish on the old one",
)
async def reload(
    _: AdminDep, state: StateDep, response: Response, body: ReloadRequest | None = None, wait: bool = False
) -> ReloadStatus:
    target = Path(body.bundle) if body is not None and body.bundle else None
    if target is None:
        if state.serving is None:
            raise NotReady("no bundle to reload")
        target = state.serving.bundle.path
    await state.reload_bundle(target, wait=wait)
    if wait:
        response.status_code = 200
    return _status(state)


@router.get("/reload", response_model=ReloadStatus, responses={401: {"model": ErrorResponse}}, summary="Last reload")
async def reload_status(_: AdminDep, state: StateDep) -> ReloadStatus:
    return _status(state)


# ---- live catalogue: changes logged to the lineage's stream, applied here before the answer ---------------
_GUARANTEE = (
    "durable in the change log; applied by this worker before this answer (a paused or deleted entity is no "
    "longer returned by it); every other worker applies it within UNIMATCH_LIVE_POLL_S plus its apply time "
    "while it reaches Redis"
)


async def _log_change(state: StateDep, serving: Serving, change: dict[str, Any]) -> ChangeAck:
    from service.live import LiveError, check_change

    follower = serving.changes
    live = serving.engine.live
    if follower is None or live is None:
        raise HTTPException(status_code=404, detail="live changes are off (UNIMATCH_LIVE_CHANGES)")
    try:
        records = check_change(serving.schema, change)  # only changes every worker can apply enter the log
    except LiveError as exc:
        raise InvalidRequest(str(exc)) from None
    if change["op"] == "upsert" and live.count + len(change["entities"]) > live.capacity:
        raise InvalidRequest(f"the live overlay is full ({live.count} of {live.capacity} rows): compact the log "
                             "into a new bundle (`unimatch index compact`)")
    try:
        # XADD, then wait (in a worker thread, blocking) until the applier has applied it from `records`
        position, mine = await asyncio.to_thread(follower.acknowledge, change, records)
    except Exception as exc:  # not in the log: not acknowledged
        raise NotReady(f"change log unavailable: {exc}") from None
    if mine is None:  # logged (other workers will apply it) but not applied here: say so, do not acknowledge
        raise NotReady(f"change logged at {position} but not applied by this worker (at {live.position}); see its log")
    return ChangeAck(
        op=change["op"], position=position, log=follower.log.key, bundle_version=serving.version,
        applied=len(mine.rows), skipped=mine.skipped, overlay_rows=live.count, guarantee=_GUARANTEE,
    )


_CHANGE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    404: {"model": ErrorResponse, "description": "live changes are off"},
    422: {"model": ErrorResponse, "description": "invalid change (unknown type, domain or feature; overlay full)"},
    503: {"model": ErrorResponse, "description": "the change log is unavailable: nothing was acknowledged"},
}


@router.post("/entities", response_model=ChangeAck, responses=_CHANGE_ERRORS,
             summary="Upsert entities (new or changed): logged, then encoded and inserted into the graph")
async def upsert_entities(_: AdminDep, state: StateDep, serving: ServingDep, body: UpsertRequest) -> ChangeAck:
    return await _log_change(state, serving, {"op": "upsert", "entities": [e.model_dump() for e in body.entities]})


@router.post("/entities/{op}", response_model=ChangeAck, responses=_CHANGE_ERRORS,
             summary="Pause, resume or delete entities by id (paused and deleted ones are never returned)")
async def switch_entities(_: AdminDep, state: StateDep, serving: ServingDep, op: Literal["pause", "resume", "delete"],
                          body: EntityIdsRequest) -> ChangeAck:
    return await _log_change(state, serving, {"op": op, "ids": list(body.ids)})
