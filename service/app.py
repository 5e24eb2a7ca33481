"""The FastAPI application: wiring only (routers, error mapping, edge middleware, lifespan).

Run with ``unimatch serve --bundle BUNDLE`` (uvicorn, factory mode: nothing happens at import).
"""

from __future__ import annotations

from fastapi import FastAPI

from service.config import Settings, get_settings
from service.errors import EdgeMiddleware, install_error_handlers
from service.lifespan import lifespan
from service.openapi import install_openapi
from service.routes import admin, health, match


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to the environment (``UNIMATCH_*``)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="UniMatch",
        summary="Online matching: user in, top-k entities out (unified multi-domain, multi-entity model)",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(match.router)
    app.include_router(health.router)
    if settings.admin_token is not None:  # admin routes exist only with a token (else 404)
        app.include_router(admin.router)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s)
    install_openapi(app)
    return app
