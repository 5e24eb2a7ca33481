"""``POST /admin/reload`` (and its status): hot-swap the serving bundle; bearer token, else disabled (404).

The router is only mounted when ``UNIMATCH_ADMIN_TOKEN`` is set; ``require_admin`` checks again, so
a token removed from a running configuration can never leave the route open.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import APIRouter, Response

from service.deps import AdminDep, StateDep
from service.errors import NotReady
from service.schemas import ErrorResponse, ReloadRequest, ReloadStatus

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
