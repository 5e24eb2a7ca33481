"""Liveness, readiness, Prometheus metrics and service introspection (``/v1/info``)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service import metrics
from service.deps import ServingDep, StateDep, is_admin
from service.schemas import Health, Info, Readiness, ReloadStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Alive (the process answers)")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "no bundle loaded and warmed yet"}},
    summary="Bundle loaded and warmed; feature store state",
)
async def readyz(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "unimatch", None)
    if state is None:
        body = Readiness(ready=False, bundle_version=None, warmed=False, feature_store={}, reload=ReloadStatus(state="idle"))
        return JSONResponse(body.model_dump(), status_code=503)
    serving = state.serving
    store = await state.store.health(serving.schema) if serving is not None else {"kind": state.store.kind}
    if serving is not None and "entity_space" in store:
        store["entity_space_match"] = store["entity_space"] == serving.entity_space
    ready = serving is not None
    # A Redis outage does not make the replica unready: it serves degraded (flagged) answers, and
    # pulling every replica out of the load balancer at once would turn degraded into down.
    body = Readiness(
        ready=ready,
        bundle_version=state.serving_version,
        warmed=ready,
        feature_store=store,
        reload=ReloadStatus(**dataclasses.asdict(state.reload), bundle_version=state.serving_version),
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics (all workers in multiprocess mode)", response_class=Response)
async def prometheus_metrics() -> Response:
    data, content_type = metrics.render()
    return Response(content=data, media_type=content_type)


# Keys of the feature store's description that name a host or a path: shown to the admin token only.
_PRIVATE_STORE_KEYS = frozenset({"redis", "data", "url", "path", "host"})


@router.get(
    "/v1/info",
    response_model=Info,
    summary="Bundle, schema, search parameters, provider, feature store (paths and hosts: admin token only)",
)
async def info(request: Request, state: StateDep, serving: ServingDep) -> Info:
    admin = is_admin(request, state)
    store = state.store.describe()
    if not admin:  # no filesystem path or Redis host to an anonymous caller
        store = {k: v for k, v in store.items() if k not in _PRIVATE_STORE_KEYS}
    engine_info = serving.engine.info()
    manifest = serving.bundle.manifest
    settings = state.settings
    return Info(
        bundle_version=serving.version,
        method=serving.method,
        kind=str(manifest.get("kind", "deep")),
        domains=list(serving.schema.domains),
        entity_types=list(serving.schema.entity_types),
        schema_fingerprint=serving.schema.fingerprint(),
        feature_schema=serving.schema.model_dump(),
        num_entities=int(serving.bundle.entity_ids.shape[0]),
        graph={k: v for k, v in manifest["graph"].items() if k != "files"} if "graph" in manifest else None,
        search=engine_info,
        provider=serving.engine.provider,
        feature_store=store,
        limits={
            "max_k": settings.max_k,
            "max_batch": settings.max_batch,
            "max_exclude": settings.max_exclude,
            "max_body_bytes": settings.max_body_bytes,
            "deadline_ms": settings.deadline_ms,
            "max_concurrency": settings.max_concurrency,
            "workers": settings.workers,
            "scoring_threads": settings.effective_scoring_threads,
            "intra_op_threads": settings.intra_op_threads,
        },
        bundle_path=str(serving.bundle.path) if admin else None,
        entity_space=serving.entity_space,
    )
