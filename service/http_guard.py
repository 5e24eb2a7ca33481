"""uvicorn's HTTP protocol with a header-read timeout, a connection cap, and shedding before the app.

uvicorn bounds the idle time *between* requests of a kept-alive connection (``timeout_keep_alive``)
but not a connection that never completes its headers: a socket that connects and sends nothing, or
a byte every few seconds (slowloris), is held forever. This subclass arms a timer when a connection
opens and when each request starts, cancels it when the headers are complete, and closes the socket
when it fires. Connections beyond ``max_connections`` are closed as soon as they are accepted, so
the worker never runs out of file descriptors. The body is bounded in ``service.errors.EdgeMiddleware``.

Under overload (admission's edge decision, ``service.admission.Admission.edge_refuse``) a
``POST /match`` is answered 503 as soon as its headers are parsed, with the answer's bytes written
straight to the transport: no ASGI task, no app, no body parsing, no validation (the body is dropped
as the parser reads it). At five times capacity most arrivals are refused, and refusing them through
the whole stack kept the event loop so busy that the admitted requests waited for it (to be resumed
after their search) longer than their searches took; a refusal through uvicorn's ASGI cycle (a task,
two send messages, a header rebuild) still cost the loop a task per refused request. A request
pipelined behind one still being answered is refused through that cycle instead (uvicorn queues it).

The limits come from the process's settings (``UNIMATCH_HEADER_TIMEOUT_S``,
``UNIMATCH_MAX_CONNECTIONS``): uvicorn builds one protocol object per connection and, with several
workers, in each worker process, so the class reads them rather than carrying them.
"""

from __future__ import annotations

import asyncio
import types
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.errors import EDGE_CHECKED_KEY


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus a header timeout and a per-worker connection cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from service.config import get_settings

        settings = get_settings()
        self.header_timeout_s = settings.header_timeout_s
        self.max_connections = settings.max_connections
        self._header_timer: asyncio.TimerHandle | None = None

    # ---- the header timer ------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            metrics.CONNECTIONS_CLOSED.labels(reason="header_timeout").inc()
            self.transport.close()

    # ---- protocol hooks --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            metrics.CONNECTIONS_CLOSED.labels(reason="connection_cap").inc()
            transport.close()
            return
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # the next request on a kept-alive connection gets its own window

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        refusal = self._edge_refusal()
        if refusal is None:
            self.scope[EDGE_CHECKED_KEY] = True  # type: ignore[literal-required]  # decided here, not again in the middleware
            super().on_headers_complete()
            return
        if self.cycle is None or self.cycle.response_complete:
            self._refuse_at_transport(refusal)
            return
        # Pipelined behind an answer in progress: uvicorn queues this one; a two-message app answers it
        # in turn (as uvicorn does for its own limit_concurrency 503) and the body is dropped as it arrives.
        app = self.app
        self.app = _shed_app(refusal)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    # ---- shedding at the protocol ----------------------------------------------------------------
    def _refuse_at_transport(self, refusal: Any) -> None:
        """Write the 503 and finish the request here; the parser's body callbacks then see an answered
        cycle and drop the body (uvicorn's ``on_body`` / ``on_message_complete`` check it)."""
        keep_alive = (self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
                      and not self.expect_100_continue)  # a client waiting to send its body: close instead
        self.cycle = _Answered(keep_alive)  # type: ignore[assignment]
        metrics.ERRORS.labels(kind=refusal.kind).inc()
        metrics.HTTP_REQUESTS.labels(route=self.url.split(b"?", 1)[0].decode("latin-1"), status=str(refusal.status)).inc()
        self.transport.write(_refusal_bytes(refusal, self.server_state.default_headers, keep_alive))
        if not keep_alive:
            self.transport.close()
            return
        self.on_response_complete()  # counts the request, resumes reading, arms the keep-alive timer

    def _edge_refusal(self) -> Any:
        """Admission's edge decision for a ``POST /match`` or ``/match/batch`` (None: let it through)."""
        if self.parser.get_method() != b"POST" or self.url.split(b"?", 1)[0] not in _SHED_PATHS:
            return None
        state = self._service_state()
        if state is None or not state.settings.edge_shed:
            return None
        return state.admission.edge_refuse(state.settings.deadline_ms / 1e3)

    def _service_state(self) -> Any:
        """The app's ``ServiceState`` (set by the lifespan; None before it), found through uvicorn's wrappers."""
        app: Any = self.app
        for _ in range(8):
            state = getattr(getattr(app, "state", None), "unimatch", None)
            if state is not None:
                return state
            app = getattr(app, "app", None)
            if app is None:
                return None
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


_SHED_PATHS = frozenset({b"/match", b"/match/batch"})


class _Answered:
    """The finished stand-in for uvicorn's ``RequestResponseCycle`` of a request refused at the transport:
    what the protocol reads of a cycle (body callbacks, the next request, connection loss, shutdown)."""

    __slots__ = ("keep_alive", "disconnected")
    response_complete = True
    message_event = types.SimpleNamespace(set=lambda: None)

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.disconnected = False


def _refusal_bytes(refusal: Any, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    """The whole HTTP/1.1 503 of ``refusal`` (an Overloaded): the same JSON as the edge middleware's."""
    import json

    body = json.dumps({"error": {"kind": refusal.kind, "message": refusal.message}}).encode()
    out = [b"HTTP/1.1 %d %s\r\n" % (refusal.status, HTTPStatus(refusal.status).phrase.encode())]
    out += [name + b": " + value + b"\r\n" for name, value in default_headers]  # date, server
    out.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    out += [k.lower().encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n" for k, v in refusal.headers.items()]
    if not keep_alive:
        out.append(b"connection: close\r\n")
    out += [b"\r\n", body]
    return b"".join(out)


def _shed_app(refusal: Any) -> Any:
    """A minimal ASGI app answering ``refusal`` (an Overloaded) as the edge middleware would: same JSON."""
    import json

    body = json.dumps({"error": {"kind": refusal.kind, "message": refusal.message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers.items()]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        metrics.ERRORS.labels(kind=refusal.kind).inc()
        metrics.HTTP_REQUESTS.labels(route=scope.get("path", "other"), status=str(refusal.status)).inc()
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app
