"""uvicorn's HTTP protocol with a header-read timeout and a connection cap (issue 20: slow clients).

uvicorn bounds the idle time *between* requests of a kept-alive connection (``timeout_keep_alive``)
but not a connection that never completes its headers: a socket that connects and sends nothing, or
a byte every few seconds (slowloris), is held forever. This subclass arms a timer when a connection
opens and when each request starts, cancels it when the headers are complete, and closes the socket
when it fires. Connections beyond ``max_connections`` are closed as soon as they are accepted, so
the worker never runs out of file descriptors. The body is bounded in ``service.errors.EdgeMiddleware``.

The limits come from the process's settings (``UNIMATCH_HEADER_TIMEOUT_S``,
``UNIMATCH_MAX_CONNECTIONS``): uvicorn builds one protocol object per connection and, with several
workers, in each worker process, so the class reads them rather than carrying them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics


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
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)
