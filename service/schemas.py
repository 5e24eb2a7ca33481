"""Request and response bodies of the HTTP API (pydantic v2); ``/openapi.json`` is generated from these.

Paper section IV-C: the ranking stage sends a user and a business domain and receives the top-k
entities of the unified entity space, best first. Limits here are the hard ceilings of the schema;
the configurable ones (``UNIMATCH_MAX_K`` ...) are checked in the route and answered with the same
422 shape.

Request models are strict: JSON types are taken as they are, so ``"k": "10"`` and ``"k": true`` are a 422
rather than silently 10 and 1 (an int is still accepted where a float is asked for).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.config import HARD_MAX_BATCH, HARD_MAX_K


class FeatureOverrides(BaseModel):
    """Real-time features that override the stored ones for this request only."""

    model_config = ConfigDict(extra="forbid", strict=True)

    categorical: dict[str, int] = Field(
        default_factory=dict, max_length=256, description="profile field name -> code (0 = unknown)"
    )
    numeric: dict[str, float] = Field(default_factory=dict, max_length=256, description="profile field name -> value")
    sequence: list[str] | None = Field(
        default=None,
        max_length=1024,
        description="replaces the stored behaviour sequence: entity ids, most recent last (unknown ids are dropped)",
    )
    recent: list[str] = Field(
        default_factory=list,
        max_length=1024,
        description="entity ids just interacted with, appended after the stored sequence (most recent last)",
    )


class MatchRequest(BaseModel):
    """One user, one domain, top k."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"user_id": "u000042", "domain": "domain_0", "k": 10}]},
    )

    user_id: str = Field(min_length=1, max_length=256)
    domain: str = Field(min_length=1, max_length=64, description="a name from GET /v1/info `domains`")
    k: int = Field(default=10, ge=1, le=HARD_MAX_K, description="results wanted; at most UNIMATCH_MAX_K")
    request_id: str | None = Field(default=None, min_length=1, max_length=128, description="echoed; generated when absent")
    exclude: list[str] = Field(default_factory=list, max_length=100_000, description="entity ids never to return")
    entity_types: list[str] | None = Field(
        default=None, max_length=64, description="only these entity types (names from /v1/info schema)"
    )
    features: FeatureOverrides | None = None
    deadline_ms: float | None = Field(
        default=None, gt=0, le=60_000, description="per-request budget, capped by UNIMATCH_DEADLINE_MS"
    )


class MatchItem(BaseModel):
    entity_id: str
    entity_type: str
    score: float


class MatchStats(BaseModel):
    """Where the time went and how much the model scored (pair evaluations = pair-scorer rows)."""

    model_config = ConfigDict(extra="allow")

    pair_evaluations: int
    mode: str = Field(description="search mode the engine used (graph beam search or exhaustive)")
    feature_source: str = Field(description="redis | embedded | cold_start")
    features_ms: float
    user_encode_ms: float
    search_ms: float
    scorer_ms: float
    total_ms: float
    steps: int = Field(default=0, description="search expansion steps (or exhaustive scorer batches)")
    unknown_override_ids: int = Field(default=0, description="entity ids of `features` overrides not in the catalogue (dropped)")
    admitted_ms: float = Field(
        default=0.0, description="from arrival at the edge until admission control let it in (body read, validation, loop lag)"
    )
    submitted_ms: float = Field(default=0.0, description="from arrival until handed to the scoring pool (includes features_ms)")
    queue_ms: float = Field(default=0.0, description="waiting for a scoring thread (admitted, not yet started)")
    runqueue_ms: float = Field(
        default=0.0, description="of the scoring thread's time, how long it waited for a CPU (Linux schedstat; 0 elsewhere)"
    )
    handoff_ms: float = Field(
        default=0.0, description="from the end of the search until the event loop resumed this request (loop lag)"
    )


class MatchResponse(BaseModel):
    request_id: str
    bundle_version: str
    method: str = Field(description="the model (training method) of the bundle")
    domain: str
    items: list[MatchItem] = Field(description="best first")
    stats: MatchStats
    cold_start: bool = Field(description="no stored features for this user: profile defaults, empty sequence")
    partial: bool = Field(description="the deadline cut the search short: best found so far")
    degraded: bool = Field(description="the feature store failed; cold-start features were used")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[MatchRequest] = Field(min_length=1, max_length=HARD_MAX_BATCH, description="at most UNIMATCH_MAX_BATCH")


class BatchResponse(BaseModel):
    results: list[MatchResponse] = Field(description="in request order")


class ValidationIssue(BaseModel):
    """One schema violation: where (``loc``, e.g. ``["body", "k"]``), what (``msg``) and pydantic's ``type``."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error: a stable ``kind`` and a human message; schema violations also list ``detail``."""

    kind: str
    message: str
    detail: list[ValidationIssue] | None = Field(default=None, description="kind `validation` only")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    bundle: str | None = Field(default=None, max_length=4096, description="bundle directory; default the current one")


class ReloadStatus(BaseModel):
    state: Literal["idle", "loading", "succeeded", "failed"]
    target: str | None = None
    bundle_version: str | None = Field(default=None, description="the version now serving")
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    bundle_version: str | None
    warmed: bool
    feature_store: dict[str, Any]
    reload: ReloadStatus


class Info(BaseModel):
    model_config = ConfigDict(extra="allow")

    bundle_version: str
    method: str
    kind: str
    domains: list[str]
    entity_types: list[str]
    schema_fingerprint: str
    feature_schema: dict[str, Any] = Field(description="FeatureSchema of the bundle (contracts/schema.py)")
    num_entities: int
    graph: dict[str, Any] | None
    search: dict[str, Any]
    provider: str
    feature_store: dict[str, Any]
    limits: dict[str, Any]
    bundle_path: str | None = Field(default=None, description="only with the admin bearer token")
    entity_space: str = Field(description="hash of the entity ids in row order (must match the feature store's)")


class EntityIn(BaseModel):
    """One entity of a live upsert, with features encoded as the dataset stores them (docs/data.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    entity_id: str = Field(min_length=1, max_length=256)
    entity_type: str = Field(min_length=1, max_length=64, description="a name from /v1/info `entity_types`")
    domains: list[str] = Field(min_length=1, max_length=64, description="domains it may be returned in")
    categorical: dict[str, int | list[int]] = Field(
        default_factory=dict, max_length=256, description="feature name -> code (a list for a multi-value feature); absent = default"
    )
    numeric: dict[str, float] = Field(default_factory=dict, max_length=256, description="feature name -> value; absent = default")


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    entities: list[EntityIn] = Field(min_length=1, max_length=10_000, description="new or changed entities, applied in order")


class EntityIdsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] = Field(min_length=1, max_length=100_000, description="entity ids (unknown ones are skipped)")


class ChangeAck(BaseModel):
    """A change durable in the log and applied by the worker that answers."""

    op: Literal["upsert", "pause", "resume", "delete"]
    position: str = Field(description="the change's position in the log (a Redis stream id)")
    log: str = Field(description="the change log (stream key) of this bundle lineage")
    bundle_version: str
    applied: int = Field(description="entities written or switched in this worker")
    skipped: int = Field(default=0, description="ids unknown when the change was applied")
    overlay_rows: int
    guarantee: str = Field(description="what this acknowledgement means for this and the other workers")
