"""Domain exceptions of the service and their mapping to HTTP errors at the edge (Netflix/dispatch style).

The core (routes' helpers, engine, bundle loader) raises these; ``install_error_handlers`` turns them
into ``{"error": {"kind", "message"}}`` with a 4xx/503 status, counts them in
``unimatch_errors_total{kind}`` and guarantees that nothing unexpected leaks as an HTML 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.engine import SearchError

log = logging.getLogger("unimatch.service")


class ServiceError(Exception):
    """Base of the errors the edge maps to HTTP; ``status`` and ``kind`` are class attributes."""

    status: int = 400
    kind: str = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    """Well-formed JSON that asks for something impossible (unknown domain, k above the maximum ...)."""

    status = 422
    kind = "invalid_request"


class Overloaded(ServiceError):
    """More requests in flight than ``UNIMATCH_MAX_CONCURRENCY``: answered at once, never queued."""

    status = 503
    kind = "overloaded"


class NotReady(ServiceError):
    status = 503
    kind = "not_ready"


class Unauthorized(ServiceError):
    status = 401
    kind = "unauthorized"


class ReloadFailed(ServiceError):
    """A new bundle failed to load, verify or warm: refused, the old one keeps serving."""

    status = 422
    kind = "reload_failed"


class ReloadBusy(ServiceError):
    status = 409
    kind = "reload_in_progress"


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map domain exceptions to HTTP; validation keeps FastAPI's 422 body but is counted."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        metrics.ERRORS.labels(kind=exc.kind).inc()
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(SearchError)
    async def _search_error(request: Request, exc: SearchError) -> JSONResponse:
        # the engine's validation of a request (k above what the domain holds, bad filters ...)
        metrics.ERRORS.labels(kind=InvalidRequest.kind).inc()
        return error_response(InvalidRequest.status, InvalidRequest.kind, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.ERRORS.labels(kind="validation").inc()
        errors = exc.errors()
        # pydantic error dicts may hold the offending input (bytes, huge strings): keep only safe fields.
        detail = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors[:50]
        ]
        # The documented ErrorResponse shape (/openapi.json), with pydantic's issues under `detail`.
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        body = {"error": {"kind": "validation", "message": f"{where}: {first['msg']}{more}", "detail": detail}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 408: "body_timeout", 413: "body_too_large"}.get(
            exc.status_code, "http"
        )
        metrics.ERRORS.labels(kind=kind).inc()
        return error_response(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: log the traceback, count it, answer JSON without internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.ERRORS.labels(kind="internal").inc()
        return error_response(500, "internal", "internal error (logged)")


# ASGI scope key under which the edge middleware stamps each request's arrival (time.monotonic()).
ARRIVED_KEY = "unimatch.arrived"
# Set by the HTTP protocol (service/http_guard.py) on a request it already let through its edge check,
# so the middleware does not decide it a second time (once is the cost; twice, a request the protocol
# let through as the edge's one-per-interval pass was refused by the middleware right after it).
EDGE_CHECKED_KEY = "unimatch.edge_checked"


class EdgeMiddleware:
    """Pure ASGI middleware: refuses bodies over ``max_body_bytes`` (413) or slower than ``body_timeout_s``
    (408), and counts answers per route.

    The body is checked against Content-Length up front and counted while streaming (chunked uploads
    have no length), so an oversized body is never buffered whole. The body timeout bounds the whole
    read from the moment the headers are in (a slow-body client holds a slot at most that long; the
    headers themselves are bounded in ``service.http_guard``). Routes are labelled by their template, unknown
    paths as "other", so no caller-chosen string becomes a label value.
    """

    ROUTES = frozenset(
        {"/match", "/match/batch", "/healthz", "/readyz", "/metrics", "/v1/info", "/admin/reload", "/openapi.json", "/docs"}
    )

    SHED_ROUTES = frozenset({"/match", "/match/batch"})

    def __init__(self, app: Any, max_body_bytes: int, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVED_KEY] = time.monotonic()
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        status_holder = {"status": 500, "started": False}
        if route in self.SHED_ROUTES and scope.get("method") == "POST" and not scope.get(EDGE_CHECKED_KEY):
            refusal = _edge_refusal(scope)
            if refusal is not None:
                await self._shed(receive, send, refusal)
                metrics.HTTP_REQUESTS.labels(route=route, status="503").inc()
                return

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = False
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body_bytes
            except ValueError:
                too_big = False
        if too_big:
            await self._reject(counting_send)
        else:
            received = 0
            body_done = False
            loop = asyncio.get_running_loop()
            read_by = None if self.body_timeout_s is None else loop.time() + self.body_timeout_s

            async def limited_receive() -> dict[str, Any]:
                nonlocal received, body_done
                if body_done or read_by is None:  # after the body, receive() waits for a disconnect: no limit
                    message = await receive()
                else:
                    try:
                        message = await asyncio.wait_for(receive(), timeout=max(0.0, read_by - loop.time()))
                    except TimeoutError:
                        raise _BodyTimeout(self.body_timeout_s or 0.0) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if received > self.max_body_bytes:
                        # An HTTPException: FastAPI re-raises it from body parsing (other errors become 400).
                        raise _BodyTooLarge(self.max_body_bytes)
                return message

            try:
                await self.app(scope, limited_receive, counting_send)
            except _BodyTooLarge:
                if status_holder["started"]:
                    raise
                await self._reject(counting_send)
            except _BodyTimeout as exc:
                if status_holder["started"]:
                    raise
                await self._reject_slow(counting_send, str(exc.detail))
        metrics.HTTP_REQUESTS.labels(route=route, status=str(status_holder["status"])).inc()

    async def _shed(self, receive: Any, send: Any, exc: ServiceError) -> None:
        """A 503 without parsing: the body is read off the connection (bounded as usual) and dropped,
        so the connection stays usable for the client's next request."""
        loop = asyncio.get_running_loop()
        read_by = loop.time() + (self.body_timeout_s or 5.0)
        received = 0
        while received <= self.max_body_bytes:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, read_by - loop.time()))
            except TimeoutError:
                break
            if message["type"] != "http.request":
                return  # the client left
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        metrics.ERRORS.labels(kind=exc.kind).inc()
        response = error_response(exc.status, exc.kind, exc.message, exc.headers)
        await response({"type": "http"}, _empty_receive, send)

    async def _reject_slow(self, send: Any, message: str) -> None:
        metrics.ERRORS.labels(kind="body_timeout").inc()
        response = error_response(408, "body_timeout", message, {"Connection": "close"})
        await response({"type": "http"}, _empty_receive, send)

    async def _reject(self, send: Any) -> None:
        metrics.ERRORS.labels(kind="body_too_large").inc()
        response = error_response(413, "body_too_large", f"request body over {self.max_body_bytes} bytes (UNIMATCH_MAX_BODY_BYTES)")
        await response({"type": "http"}, _empty_receive, send)


def _edge_refusal(scope: dict[str, Any]) -> ServiceError | None:
    """Admission's edge decision for this request (None: let it through to the route)."""
    app = scope.get("app")
    state = getattr(getattr(app, "state", None), "unimatch", None)
    if state is None or not state.settings.edge_shed:
        return None
    refusal: ServiceError | None = state.admission.edge_refuse(state.settings.deadline_ms / 1e3)
    return refusal


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes (UNIMATCH_MAX_BODY_BYTES)")


class _BodyTimeout(StarletteHTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"request body not received within {seconds:g} s (UNIMATCH_BODY_TIMEOUT_S)", {"Connection": "close"})


async def _empty_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}
