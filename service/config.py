"""Service settings, read from ``UNIMATCH_*`` environment variables (pydantic-settings).

This is the only place the service reads the environment (STYLE.md "Config and CLI"). Every knob that
trades latency, memory or CPU is here with the reason for its default; ``docs/service.md`` has the
table operators read.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.cpus import available_cpus

# Hard ceilings baked into the OpenAPI schema; the configurable limits below must stay under them.
HARD_MAX_K = 10_000
HARD_MAX_BATCH = 1_000


def _cores() -> int:
    # The cgroup CPU quota (a pod's limits.cpu), not the node's cores: service/cpus.py says why.
    return available_cpus()


IntTuple = Annotated[tuple[int, ...] | None, NoDecode]
# uvicorn's and the service's log level (`unimatch serve --log-level`, UNIMATCH_LOG_LEVEL)
LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseSettings):
    """Everything `unimatch serve` can be told; env names are the field names upper-cased with ``UNIMATCH_``."""

    model_config = SettingsConfigDict(env_prefix="UNIMATCH_", extra="ignore", frozen=True)

    # ---- what to serve ---------------------------------------------------------------------------
    bundle: Path | None = Field(default=None, description="serving bundle directory (docs/bundle-format.md)")
    verify_checksums: bool = Field(
        default=True, description="sha256 every bundle file on load and reload (seconds on a 1M bundle; worth it)"
    )
    # ---- features --------------------------------------------------------------------------------
    redis_url: str | None = Field(default=None, description="Redis with user features; unset = embedded store")
    data: Path | None = Field(default=None, description="dataset directory for the embedded feature store")
    redis_key_prefix: str = Field(default="unimatch", min_length=1, max_length=64)
    # One connection per in-flight request is enough; beyond the pool a request waits at most
    # redis_timeout_s for a connection and then falls back (degraded) instead of queueing.
    redis_pool_size: int = Field(default=32, ge=1, le=1024)
    # A local Redis GET answers in ~0.1 ms; 50 ms means "down or overloaded", and the request still
    # meets its deadline on the cold-start path.
    redis_timeout_s: float = Field(default=0.05, gt=0, le=5)
    # After a failure, skip Redis for this long (requests go straight to the degraded path) so a dead
    # Redis costs no connect attempt per request; the first request after it probes again.
    redis_retry_interval_s: float = Field(default=1.0, ge=0, le=60)
    # ---- request limits --------------------------------------------------------------------------
    max_k: int = Field(default=1000, ge=1, le=HARD_MAX_K, description="largest k a request may ask for")
    max_batch: int = Field(default=64, ge=1, le=HARD_MAX_BATCH, description="largest /match/batch")
    max_exclude: int = Field(default=10_000, ge=0, description="largest `exclude` list")
    # 1 MiB holds a batch of 64 requests with 10k excluded ids each; anything bigger is a mistake.
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # ---- HTTP connections (uvicorn; service/http_guard.py) ----------------------------------------------
    # A client must finish sending its request line and headers this long after connecting (or after
    # starting the next request on a kept-alive connection); idle and slowloris sockets are closed.
    header_timeout_s: float = Field(default=5.0, gt=0, le=600)
    # The whole body must arrive this long after the headers; beyond it 408 and the connection closes.
    body_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # An idle kept-alive connection is closed after this long (uvicorn's timeout_keep_alive).
    keep_alive_timeout_s: float = Field(default=5.0, gt=0, le=600)
    # Open connections per worker beyond which new ones are closed at once; under the usual 1024 open
    # files limit, so the process never runs out of descriptors (for Redis, bundle files, logs).
    max_connections: int = Field(default=900, ge=1, le=1_000_000)
    # ---- latency and load ------------------------------------------------------------------------
    # Per-request budget for encoding + search; beyond it the best results so far are returned, flagged.
    deadline_ms: float = Field(default=100.0, gt=0, le=60_000)
    # Requests in flight per worker beyond which we answer 503 + Retry-After immediately.
    max_concurrency: int = Field(default=64, ge=1)
    retry_after_s: int = Field(default=1, ge=0, le=3600)
    # A /match/batch holds one slot per entry, but at most this share of max_concurrency, and runs its
    # entries on at most half the scoring threads: single requests keep being served beside it.
    batch_share: float = Field(default=0.25, gt=0, le=1)
    # Refuse /match at the edge, before its body is parsed, when the loop's standing delay + the queue
    # wait + a search would pass the deadline (service/admission.py).
    # Off: such requests are parsed, validated and refused in the route (the same answer, dearer).
    edge_shed: bool = True
    # The quantile of the recent service times a search must have left when it would queue, and when a
    # scoring thread starts it (service/admission.py); higher = fewer answers cut, more 503s.
    admission_quantile: float = Field(default=0.95, gt=0.5, le=1.0)
    # Feedback from the answers (service/admission.py, Headroom): above this share of partial answers
    # among the recent ones, admission lets in less work. 1.0 = off.
    admission_partial_target: float = Field(default=0.005, gt=0, le=1.0)
    # The largest share of a request's remaining budget its planned work may fill (the headroom's
    # ceiling, and its start): the margin kept before any partial answer has taught the feedback.
    admission_ceiling: float = Field(default=1.0, gt=0.1, le=1.0)
    # ---- threads: workers x scoring_threads x intra_op_threads <= cores ----------------------------
    workers: int = Field(default=1, ge=1, le=256, description="uvicorn worker processes (set by `unimatch serve`)")
    scoring_threads: int | None = Field(default=None, ge=1, le=256, description="thread pool per worker; default cores // workers")
    intra_op_threads: int = Field(default=1, ge=1, le=256, description="onnxruntime intra-op threads per session run")
    # The search's randomly read per-row arrays (graph lists, entity tables, domain mask, visited sets) in
    # transparent huge pages (service/hugepages.py): ~1 point less time outside onnxruntime on synth 1M
    # (docs/search-benchmark.md "Seventh session"), for private copies instead of the memory maps' shared
    # page cache (~420 MB per worker process at 1M rows): off by default.
    huge_pages: bool = False
    # auto: CUDA when onnxruntime has it (onnxruntime-gpu on a GPU host), else CPU with a log line saying so.
    providers: Literal["cpu", "cuda", "auto"] = Field(default="auto", description="onnxruntime execution provider")
    # Merge concurrent requests' scorer calls (pair_scorer_batched.onnx). None = on with CUDA, off on CPU,
    # where one batcher thread would serialise what the worker threads score in parallel (docs/search-benchmark.md).
    batch_requests: bool | None = None
    # ---- search parameters (None = the engine's defaults); env values are comma lists: "64,32,16,8"
    search_ef: IntTuple = None
    search_steps: IntTuple = None
    search_top_n: IntTuple = None
    search_max_degree: IntTuple = None  # per-layer cap on neighbours expanded per node, 0 = all
    search_exhaustive_threshold: int | None = Field(default=None, ge=0)
    search_whole_top_layer_up_to: int | None = Field(default=None, ge=0)
    # Use the bundle's calibration (`unimatch index calibrate`): per domain and k the measured cheapest
    # point that meets its coverage target, or exhaustive scoring. Any UNIMATCH_SEARCH_* above overrides it.
    search_calibration: bool = True
    # ---- live search-quality monitor: a sampled share of requests re-scored exhaustively off the request
    # path, coverage@k recorded per domain beside the calibrated figure (unimatch_search_shadow_coverage).
    shadow_rate: float = Field(default=0.001, ge=0, le=1)
    # Requests waiting for the monitor; when full, new samples are dropped (never a wait on the request path).
    shadow_queue: int = Field(default=8, ge=1, le=1024)
    # Share of one core the monitor's thread may use: it sleeps (1/share - 1) x the time of each re-scoring.
    shadow_cpu_share: float = Field(default=0.1, gt=0, le=1)
    # The monitor's exhaustive scan waits, between small onnxruntime calls, while every CPU serves a
    # request (service.shadow); false scans like a request does, with only a low OS priority.
    shadow_yield: bool = True
    # While yielding, a chunk starts only when 1 + this many CPUs serve no request (the spare ones are for
    # requests arriving during the chunk); 0 = any free CPU (the sixth session's rule).
    shadow_spare_cpus: int = Field(default=1, ge=0, le=1024)
    # ---- admin -----------------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(default=None, description="bearer token of /admin/*; unset = disabled")
    # Directory through which /admin/reload reaches every worker process (set by `unimatch serve`).
    control_dir: Path | None = None
    control_poll_s: float = Field(default=1.0, gt=0, le=60)
    # ---- live catalogue (service/live.py, service/changes.py; docs/live-catalogue.md) ------------------
    # POST /admin/entities*: upserts, pauses, resumes, deletes logged to a Redis stream (needs
    # UNIMATCH_REDIS_URL) and applied by every worker; off by default (memory: live_capacity rows).
    live_changes: bool = Field(default=False, description="accept and follow live catalogue changes")
    # Rows the overlay can add before a compaction (`unimatch index compact`) is needed; each costs its
    # entity tensors + vector + a few graph rows (about 2 KB at d=64).
    live_capacity: int = Field(default=100_000, ge=1, le=50_000_000)
    # How long another worker's acknowledged change may take to reach this one (XREAD BLOCK timeout).
    live_poll_s: float = Field(default=0.1, gt=0, le=10)
    # Candidate list of an online insertion (the HNSW paper's ef_construction). 64: coverage after 10% of
    # the catalogue inserted online was the same as at 100 (amazon phone/electronic down to 16; synth 1M
    # 0.999 of a rebuild at 48-100, 0.991 at 32), at ~30% less insertion CPU per upsert than 100, so 2x
    # above the smallest value seen to lose coverage (docs/live-catalogue.md, seventh session).
    live_ef_construction: int = Field(default=64, ge=8, le=2000)
    # OS priority of the applier thread that applies every change (this worker's own and the others'):
    # idle = SCHED_IDLE (runs only on CPU the scoring threads leave), nice = nice 19 (also the fallback
    # where SCHED_IDLE is refused), normal = as the scoring threads (docs/live-catalogue.md).
    live_apply_priority: Literal["idle", "nice", "normal"] = "idle"
    # > 0: the applier inserts a change's entities 4 at a time, each after waiting (at most this long)
    # for a moment with no /match in flight in its worker, so it does not share the machine with one
    # (service/activity.py); 0 = off: the OS priority alone decides.
    live_apply_yield_s: float = Field(default=0.0, ge=0, le=10)
    # How long an acknowledging request waits for the applier before it answers 503 (logged, not applied).
    live_ack_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # ---- bundle rollout (service/bundle_watch.py) --------------------------------------------------
    # Follow UNIMATCH_BUNDLE when it is a symlink (/bundles/current): reload when it moves.
    bundle_watch: bool = Field(default=False, description="watch the bundle pointer and reload when it moves")
    bundle_watch_poll_s: float = Field(default=2.0, gt=0, le=600)
    # Each worker waits a random share of this before reloading, so replicas do not all spend their
    # CPU on load + verify + warm-up at the same moment.
    bundle_watch_stagger_s: float = Field(default=10.0, ge=0, le=3600)
    log_level: LogLevel = "info"

    @field_validator("search_ef", "search_steps", "search_top_n", "search_max_degree", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            return tuple(int(part) for part in value.replace(" ", "").split(","))
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        # UNIMATCH_ADMIN_TOKEN="" must disable admin, not enable it with an empty password.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("redis_url", "bundle", "data", "control_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # UNIMATCH_BUNDLE="" is unset, not the current directory (Path("") is ".").
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_live(self) -> Settings:
        if self.live_changes and not self.redis_url:
            raise ValueError("live_changes needs redis_url: the change log is a Redis stream every worker reads")
        return self

    @model_validator(mode="after")
    def _check_search(self) -> Settings:
        given = [v for v in (self.search_ef, self.search_steps, self.search_top_n) if v is not None]
        if any(x <= 0 for v in given for x in v):
            raise ValueError("search_ef, search_steps and search_top_n must be positive integers")
        if self.search_max_degree is not None and min(self.search_max_degree, default=0) < 0:
            raise ValueError("search_max_degree must be integers >= 0 (0 = every neighbour)")
        return self

    @property
    def effective_scoring_threads(self) -> int:
        """Threads scoring concurrently in this worker: by default the cores shared out over the workers."""
        if self.scoring_threads is not None:
            return self.scoring_threads
        return max(1, _cores() // (self.workers * self.intra_op_threads))

    @property
    def cores(self) -> int:
        return _cores()

    @property
    def oversubscribed(self) -> bool:
        return self.workers * self.effective_scoring_threads * self.intra_op_threads > self.cores


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (tests build ``Settings(...)`` directly and pass it to create_app)."""
    return Settings()
