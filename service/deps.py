"""FastAPI dependencies: the one place routes reach the heavy objects on ``app.state`` (STYLE.md)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.errors import NotReady, Unauthorized
from service.loading import Serving
from service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "unimatch", None)
    if state is None:
        raise NotReady("the service is starting")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_serving(state: StateDep) -> Serving:
    """The bundle to use for this whole request: taken once, so a reload mid-request cannot mix bundles."""
    serving = state.serving
    if serving is None:
        raise NotReady("no bundle loaded yet")
    return serving


ServingDep = Annotated[Serving, Depends(get_serving)]


def is_admin(request: Request, state: ServiceState) -> bool:
    """True when the request carries the configured admin bearer token (False when none is configured)."""
    token = state.settings.admin_token
    if token is None:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the token matched.
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode())


def require_admin(request: Request, state: StateDep) -> None:
    """Bearer-token check of /admin/*; without a configured token the routes do not exist (404)."""
    token = state.settings.admin_token
    if token is None:
        raise HTTPException(status_code=404, detail="Not Found")
    if not is_admin(request, state):
        raise Unauthorized("admin routes need 'Authorization: Bearer <UNIMATCH_ADMIN_TOKEN>'", headers={"WWW-Authenticate": "Bearer"})


AdminDep = Annotated[None, Depends(require_admin)]
