"""The retrieval engine: one user, one domain, k -> the top-k entities of the deep model (paper IV-B).

``MatchEngine`` ties the pieces together for the service and the benchmark: the bundle
(``contracts.bundle``), the onnxruntime scorer (``service.scoring``: user encoder once per request, pair
scorer once per expansion step) and NANN's beam search over the 4-layer HNSW graph
(``service.search``). Small eligible catalogues are scored exhaustively instead (cheaper than a search
that would visit most of them anyway, and exact), chosen per request by ``exhaustive_threshold``.

``match`` is thread-safe: the sessions are shared (``InferenceSession.run`` is thread-safe and releases
the GIL) and each worker thread keeps its own generation-stamped visited set. Never imports torch.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from contracts.bundle import Bundle
from contracts.calibration import CalibratedPoint
from contracts.dataset import PAD
from contracts.features import UserFeatures
from service.activity import Activity
from service.hugepages import huge_copy
from service.live import LiveCatalogue
from service.scoring import make_scorer
from service.scoring.batching import BatchingScorer
from service.scoring.host import CPU as CPU_PROVIDER
from service.scoring.host import HostGatherScorer, UserContext
from service.search import KeepRows, LayerStats, LiveGraph, RequestBeam, SearchOutcome, VisitedSet, best_first, search

log = logging.getLogger("unimatch.engine")

MODES = ("graph", "exhaustive")
EXHAUSTIVE_CHUNK_CPU = 2048  # rows per onnxruntime call in exhaustive mode on CPU (see MatchEngine)
# Rows per call of a background exhaustive scan (the shadow monitor) on CPU: it checks for waiting
# requests between calls, so a call's length (~1.5 ms here at ~3 us per pair) is what a request that
# arrives meanwhile can wait for a core.
BACKGROUND_CHUNK_CPU = 512
_ALL_LIVE = np.zeros(0, dtype=np.bool_)  # KeepRows.live of a bundle without live changes: every row


class SearchError(ValueError):
    """A match request the engine cannot answer: bad k, unknown domain, bad filters or features."""


@dataclass(frozen=True)
class SearchParams:
    """Per-layer beam-search parameters, top layer first (a 4-layer graph takes 4 values each).

    Defaults measured on the 100k synthetic catalogue (docs/search-benchmark.md): NANN's 3-layer setting
    (ef {100, 200, 400}, T {1, 1, 3}) stops the bottom layer before it converges on our graphs
    (coverage@200 0.963 at 5.8% scored); narrow upper layers and more bottom steps reach 0.999 at ~1.5%.
    """

    # ef[0] >= the top layer's size scores the whole top layer as the entry set (NANN); the 4-layer
    # graphs of 100k..1M entities have 32..~300 top-layer nodes. The bottom ef is raised to k per request.
    ef: tuple[int, ...] = (32, 8, 16, 200)
    # T per layer; the search stops early once no new node enters the beam, so a generous bottom T only
    # costs steps on hard queries (T = 2 gave coverage 0.17 at 100k: the beam had not converged).
    steps: tuple[int, ...] = (1, 1, 2, 10)
    # Results kept from each layer for the final merge; the bottom layer always keeps at least k.
    top_n: tuple[int, ...] = (8, 8, 16, 200)
    # An eligible catalogue (domain and type filter) this small is scored whole: a search scores
    # ~1.5-2k pairs at k=200 anyway, and exhaustive scoring is exact.
    exhaustive_threshold: int = 4096
    # Per layer, top layer first: expand only each node's first max_degree neighbours (0 = all; empty
    # = no cap anywhere). The index builder stores lists nearest first; capping layer 0's 2M = 32 edges
    # trades pairs per step against steps (docs/search-benchmark.md measures it at 1M: little gain).
    max_degree: tuple[int, ...] = ()
    # The top layer is scored whole as the entry set when it has at most this many nodes (NANN's
    # choice), whatever ef[0] is. It grows as N / M^3: 32 nodes at 100k, 265 at 1M, ~2.4k at 10M. At 1M
    # the single graph entry point with ef[0] = 32 needed T = 16 bottom steps and 1.35% of the
    # catalogue for coverage@200 1.0; the whole 265-node top layer reached 0.9999 with 0.14%
    # (docs/search-benchmark.md, "Current state").
    whole_top_layer_up_to: int = 4096
    # Add the user's own history rows to the bottom layer's entry set (``search(seeds=...)``): up to
    # max_seq_len extra entry nodes, more pairs scored from each. Off by default (on amazon phone/electronic
    # it cost 2.2-2.5x the pairs for little coverage); `unimatch index calibrate` turns it on per domain
    # where it is the cheaper way to the target.
    seed_history: bool = False
    # Rank the request's returnable rows (its domain, types, exclusions) first in the bottom layer's beam,
    # so a beam of ef holds ef returnable candidates (``search_layer(prefer=...)``), as hnswlib's filtered
    # search keeps only accepted elements in its result list. On amazon phone/electronic (two domains in
    # one graph) it took coverage@200 from 0.855 to 0.998 for 23% more pairs (docs/search-benchmark.md,
    # "Why the beam stalled, and the fix"); where every entity is returnable it changes nothing.
    filter_beam: bool = True
    # Raise the bottom layer's ef to k per request (``for_k``). The answer is the top-k of every row the
    # bottom layer scored, not of its beam, so a beam narrower than k can find the model's top-k for
    # fewer pairs (synth 1M, k=200: ef 100 reached coverage 0.996-0.997 at 0.17% scored where ef 200 took
    # 0.25%; amazon phone/electronic: ef 60-100 reached 0.991 at 1.6x fewer pairs; docs/search-benchmark.md,
    # sixth session). Only measured points turn it off: the calibration's (its ladder goes below k).
    bottom_ef_floor: bool = True

    def __post_init__(self) -> None:
        if not (len(self.ef) == len(self.steps) == len(self.top_n)) or not self.ef:
            raise SearchError(f"ef, steps and top_n need one value per layer, got {self.ef}, {self.steps}, {self.top_n}")
        if min(self.ef) < 1 or min(self.steps) < 0 or min(self.top_n) < 0 or self.exhaustive_threshold < 0:
            raise SearchError("ef must be >= 1, steps, top_n and exhaustive_threshold >= 0")
        if self.whole_top_layer_up_to < 0:
            raise SearchError(f"whole_top_layer_up_to must be >= 0, got {self.whole_top_layer_up_to}")
        if self.max_degree and (len(self.max_degree) != len(self.ef) or min(self.max_degree) < 0):
            raise SearchError(f"max_degree needs one value >= 0 per layer (0 = all neighbours), got {self.max_degree}")

    @property
    def narrow(self) -> bool:
        """The bottom ef is taken as measured, even below k (a calibrated point)."""
        return not self.bottom_ef_floor

    def for_k(self, k: int) -> SearchParams:
        """The bottom layer keeps at least k results (top-n); its beam is at least k wide too, unless the
        point was measured narrower (``bottom_ef_floor`` off)."""
        return SearchParams(
            ef=(*self.ef[:-1], max(self.ef[-1], k) if self.bottom_ef_floor else self.ef[-1]),
            steps=self.steps,
            top_n=(*self.top_n[:-1], max(self.top_n[-1], k)),
            exhaustive_threshold=self.exhaustive_threshold,
            max_degree=self.max_degree,
            whole_top_layer_up_to=self.whole_top_layer_up_to,
            seed_history=self.seed_history,
            filter_beam=self.filter_beam,
            bottom_ef_floor=self.bottom_ef_floor,
        )


@functools.lru_cache(maxsize=4096)
def params_for_k(params: SearchParams, k: int) -> SearchParams:
    """``params.for_k(k)``, built once per (params, k) rather than as a new dataclass on every request."""
    return params.for_k(k)


@dataclass(frozen=True)
class SearchStats:
    """Where one match's time went and how much the model scored (``MatchResult.stats``)."""

    pair_evaluations: int  # pair-scorer rows evaluated
    scorer_calls: int
    steps: int  # search expansion steps (exhaustive: scorer batches)
    eligible: int  # entities the request could return (domain and type filter)
    user_encode_ms: float
    search_ms: float
    scorer_ms: float  # inside onnxruntime calls
    gather_ms: float  # entity-tensor gathers on the host (zero when gathered inside the graph)
    total_ms: float
    layers: tuple[LayerStats, ...] = ()  # graph mode: per layer, top first
    batch: int = 1  # requests searched together (``match_many``'s lockstep); 1 for ``run``
    widened: bool = False  # a calibrated beam narrower than k saw too few rows and searched again at k


@dataclass
class MatchResult:
    rows: np.ndarray  # (k',) int64 entity rows, best first (k' <= k when filters leave fewer)
    scores: np.ndarray  # (k',) float32
    mode: str  # "graph" | "exhaustive"
    partial: bool  # the deadline stopped the search: best found so far
    stats: SearchStats


@dataclass(frozen=True)
class MatchQuery:
    """One validated request, built by ``MatchEngine.query`` (the only validation a request goes
    through) and run by ``MatchEngine.run``."""

    user: UserFeatures
    domain: int
    k: int
    entity_types: np.ndarray | None  # unique int64 type indices, or None for all
    exclude_rows: np.ndarray | None  # unique int64 rows, or None
    eligible: int  # entities this query may return before exclusions
    deadline: float | None = None  # absolute time.monotonic(); past it the search stops at the next step


@dataclass(frozen=True)
class EngineRequest:
    """One request of ``MatchEngine.match_many``: the arguments of ``match``."""

    user: UserFeatures
    domain: int
    k: int
    exclude_rows: np.ndarray | None = None
    entity_types: Sequence[int] | None = None
    deadline: float | None = None
    mode: str | None = None
    params: SearchParams | None = None


class _TimedScore:
    """Wraps the scorer for one request: counts pair evaluations and time inside onnxruntime calls."""

    def __init__(self, scorer: HostGatherScorer, ctx: UserContext) -> None:
        self.scorer, self.ctx = scorer, ctx
        self.pairs = 0
        self.calls = 0
        self.seconds = 0.0  # inside onnxruntime calls only
        self.gather_seconds = 0.0  # entity-tensor gathers on the host (zero when gathered in the graph)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out, gather_s, ort_s = self.scorer.score_timed(self.ctx, rows)
        self.seconds += ort_s
        self.gather_seconds += gather_s
        self.pairs += int(rows.size)
        self.calls += 1
        return out




class MatchEngine:
    """Top-k matching over one bundle; build once per process, call ``match`` from many threads."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        params: SearchParams | None = None,
        intra_op_threads: int = 1,
        providers: Sequence[str] | None = None,
        fp16_tables: bool = False,
        batch_requests: bool | None = None,
        use_calibration: bool | None = None,
        search_loop: str = "fused",
        live_capacity: int = 0,
        live_ef_construction: int = 64,
        huge_pages: bool = False,
    ) -> None:
        self.bundle = bundle
        # The randomly read per-row arrays (graph lists, entity tables, domain mask, entity types, each
        # thread's visited set) copied into transparent huge pages (``service.hugepages``), at the cost of
        # private copies instead of the memory maps' shared page cache: measured, not the default.
        self.huge_pages = huge_pages
        self.activity = Activity()  # requests in flight (the live applier can wait for none: service.activity)
        # "fused" (one compiled call per model call, ``service.search.fused_search``), "compiled" (the
        # per-step ``RequestBeam`` it replaced) or "numpy" (the reference loop): benchmarks compare them.
        if search_loop not in ("fused", "compiled", "numpy"):
            raise SearchError(f"search_loop must be 'fused', 'compiled' or 'numpy', got {search_loop!r}")
        self.search_loop = search_loop
        self.params = params or SearchParams()
        # The bundle's calibration decides mode and operating point per (domain, k) unless parameters
        # were given explicitly (UNIMATCH_SEARCH_* settings, benchmarks): those override it.
        if use_calibration is None:
            use_calibration = params is None
        self.calibration = bundle.calibration if use_calibration and bundle.graph is not None else None
        self.intra_op_threads = intra_op_threads
        self.scorer = make_scorer(
            bundle, providers=providers, intra_op_threads=intra_op_threads, fp16_tables=fp16_tables,
            batch_requests=batch_requests,
        )
        self.provider = self.scorer.provider
        # Exhaustive mode's rows per onnxruntime call. On CPU smaller calls score faster per pair: at 2,048
        # rows a layer's activations stay in cache, at 16,384 they do not (thread CPU time per pair,
        # amazon phone/electronic and synth 1M models: 2.5-3.1 us at 1-2k rows, 3.3-4.2 us at 16k; the
        # calibration's reference and the shadow monitor are exhaustive scans). A device keeps its
        # large batches.
        self.exhaustive_chunk = (
            min(self.scorer.max_batch, EXHAUSTIVE_CHUNK_CPU) if self.provider == CPU_PROVIDER else self.scorer.max_batch
        )
        self.background_chunk = (
            min(self.scorer.max_batch, BACKGROUND_CHUNK_CPU) if self.provider == CPU_PROVIDER else self.scorer.max_batch
        )

        graph = bundle.graph
        if huge_pages and graph is not None:
            graph = replace(graph, offsets=tuple(huge_copy(np.asarray(o)) for o in graph.offsets),
                            neighbors=tuple(huge_copy(np.asarray(n)) for n in graph.neighbors))
        if huge_pages and type(self.scorer) is HostGatherScorer:  # the device scorers keep theirs on the device
            self.scorer.tables = {name: huge_copy(t) for name, t in self.scorer.tables.items()}
        if graph is not None and graph.num_layers != len(self.params.ef):
            raise SearchError(f"search params are for {len(self.params.ef)} layers, the graph has {graph.num_layers}")
        if graph is None:
            log.warning("bundle %s has no graph (run `unimatch index build`): every request is exhaustive", bundle.path)
        self._local = threading.local()
        self._num_domains = bundle.schema.num_domains
        self._num_types = bundle.schema.num_entity_types
        etype = np.asarray(bundle.entity_type, dtype=np.int64)
        mask = np.asarray(bundle.domain_mask)
        if huge_pages:
            etype, mask = huge_copy(etype), huge_copy(mask)
        self._etype: np.ndarray = etype
        self._mask: np.ndarray = mask
        # Per domain: eligible rows (for exhaustive mode) and counts per entity type (mode choice, k check).
        self._domain_rows: list[np.ndarray] = []
        counts = np.zeros((self._num_domains, self._num_types), dtype=np.int64)
        for d in range(self._num_domains):
            rows = np.flatnonzero(mask & np.uint64(1 << d)).astype(np.int64)
            self._domain_rows.append(rows)
            counts[d] = np.bincount(etype[rows], minlength=self._num_types)[: self._num_types]
        self._type_counts = counts
        # Live catalogue (service/live.py): rows added online after the E base rows, a live mask checked
        # where results are taken, the graph overlay walked with the base graph. Off when capacity is 0.
        self.live: LiveCatalogue | None = None
        self.graph = graph
        if live_capacity > 0:
            if type(self.scorer) is not HostGatherScorer:
                raise SearchError(f"live changes need the host-gather (CPU) scorer, not {type(self.scorer).__name__}")
            space = (bundle.manifest.get("graph") or {}).get("space", "vectors")
            if graph is not None and space != "vectors":
                # Online insertion finds neighbours by L2 over the entity vectors (service/overlay.py); a
                # graph over score profiles would get edges from another space.
                raise SearchError(f"live changes need a graph over the entity vectors; {bundle.path}'s is over "
                                  f"{space!r} (rebuild with `unimatch index build --space vectors`)")
            self.live = LiveCatalogue(bundle, capacity=live_capacity, type_counts=counts,
                                      ef_construction=live_ef_construction)
            self._mask, self._etype = self.live.domain_mask, self.live.entity_type
            self.scorer.live = self.live
            if graph is not None:
                self.graph = LiveGraph(**{f.name: getattr(graph, f.name) for f in fields(graph)},
                                       overlay=self.live.overlay)
        # Per domain: (bucket k, mode, params) from the calibration, resolved once here, not per request.
        self._calibrated: list[list[tuple[int, str, SearchParams, CalibratedPoint]]] = [[] for _ in range(self._num_domains)]
        self._above_buckets: dict[tuple[int, int], tuple[str, SearchParams]] = {}  # k above every bucket
        if self.calibration is not None:
            for d, name in enumerate(bundle.schema.domains):
                for pt in self.calibration.domains.get(name, ()):
                    self._calibrated[d].append((pt.k, pt.mode, pt.params(self.params).for_k(pt.k), pt))

    # ---- per-thread state --------------------------------------------------------------------------
    def _visited(self) -> VisitedSet:
        v = getattr(self._local, "visited", None)
        if v is None:
            v = VisitedSet(self.num_rows, huge_pages=self.huge_pages)
            self._local.visited = v
        return v

    @property
    def num_rows(self) -> int:
        """Rows a result may name: the bundle's, plus the live overlay's capacity."""
        return self.bundle.num_entities + (self.live.capacity if self.live is not None else 0)

    def row_of(self, entity_id: str) -> int | None:
        """The row an external id names now (live upserts and deletes included)."""
        return self.live.row_of(entity_id) if self.live is not None else self.bundle.row_of(entity_id)

    def ids_of(self, rows: np.ndarray) -> list[str]:
        if self.live is not None:
            return self.live.ids_of(rows)
        return [str(e) for e in np.asarray(self.bundle.entity_ids[rows]).tolist()]

    def types_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._etype[rows])

    def _visited_pool(self, n: int) -> list[VisitedSet]:
        """``n`` visited sets of this thread for a lockstep batch (kept and reused: 12 bytes per entity each)."""
        pool: list[VisitedSet] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = []
            self._local.pool = pool
        while len(pool) < n:
            pool.append(VisitedSet(self.num_rows, huge_pages=self.huge_pages))
        return pool[:n]

    # ---- the request -------------------------------------------------------------------------------
    def yield_live_changes(self, max_s: float, chunk: int = 4) -> None:
        """Make the live applier insert ``chunk`` entities at a time, each after waiting (at most ``max_s``)
        for a moment with no request in flight in this engine; ``max_s`` 0 turns it off."""
        if self.live is None:
            return
        if max_s > 0:
            activity = self.activity
            self.live.yield_to = lambda: activity.wait_quiet(max_s)
            self.live.insert_chunk = max(1, int(chunk))
        else:
            self.live.yield_to = None
            self.live.insert_chunk = 0

    def query(
        self,
        user: UserFeatures,
        domain: int,
        k: int,
        *,
        exclude_rows: np.ndarray | None = None,
        entity_types: Sequence[int] | None = None,
        deadline: float | None = None,
    ) -> MatchQuery:
        """Validate one request against the bundle; raises ``SearchError`` with a one-line reason.

        ``exclude_rows`` and ``entity_types`` filter what is returned (the search still walks through
        filtered nodes). ``deadline`` is an absolute ``time.monotonic()``: past it the search stops at the
        next step and returns the best so far with ``partial=True``.
        """
        schema = self.bundle.schema
        if isinstance(domain, bool) or not isinstance(domain, int | np.integer) or not 0 <= domain < self._num_domains:
            raise SearchError(f"unknown domain index {domain!r}; expected 0..{self._num_domains - 1} ({schema.domains})")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        eligible = int(self._type_counts[domain].sum())
        if k > eligible:
            raise SearchError(f"k={k} exceeds the {eligible} entities eligible in domain {schema.domains[domain]!r}")
        types = None
        if entity_types is not None:
            types = np.unique(np.asarray(list(entity_types), dtype=np.int64))
            if types.size == 0 or types.min() < 0 or types.max() >= self._num_types:
                raise SearchError(f"entity_types must be non-empty indices in 0..{self._num_types - 1}, got {list(entity_types)}")
        excl = None
        if exclude_rows is not None:
            excl = np.asarray(exclude_rows)
            if excl.ndim != 1 or (excl.size and (excl.dtype.kind not in "iu" or excl.min() < 0 or excl.max() >= self.num_rows)):
                raise SearchError(f"exclude_rows must be a 1-d array of entity rows in 0..{self.num_rows - 1}")
            excl = np.unique(excl.astype(np.int64)) if excl.size else None
        cu, cn, L = len(schema.user_categorical), len(schema.user_numeric), schema.max_seq_len
        if np.shape(user.cat) != (cu,) or np.shape(user.num) != (cn,) or np.shape(user.seq) != (L,):
            raise SearchError(
                f"user features must have shapes cat ({cu},), num ({cn},), seq ({L},); got "
                f"{np.shape(user.cat)}, {np.shape(user.num)}, {np.shape(user.seq)}"
            )
        seq = np.asarray(user.seq)
        if seq.size and (seq.min() < PAD or seq.max() >= self.bundle.num_entities):
            raise SearchError(f"user sequence rows must be {PAD} (padding) or in 0..{self.bundle.num_entities - 1}")
        counts = self._type_counts[domain]
        eligible = int(counts.sum() if types is None else counts[types].sum())
        return MatchQuery(user=user, domain=int(domain), k=int(k), entity_types=types, exclude_rows=excl,
                          eligible=eligible, deadline=deadline)

    def _keep_fn(self, domain: int, types: np.ndarray | None, excl: np.ndarray | None) -> KeepRows:
        """The request's returnable rows (domain, entity types, exclusions, the live catalogue's flags) as
        data: one compiled call per batch of rows, or inside the fused loop's compiled step."""
        type_ok = np.zeros(0, dtype=np.bool_)
        if types is not None:
            type_ok = np.zeros(self._num_types, dtype=np.bool_)
            type_ok[types] = True
        excluded = np.zeros(0, dtype=np.int64) if excl is None else np.ascontiguousarray(excl, dtype=np.int64)  # sorted
        live = self.live.live if self.live is not None else _ALL_LIVE  # paused, deleted, superseded: never returned
        return KeepRows(mask=self._mask, bit=np.uint64(1 << domain), etype=self._etype, type_ok=type_ok,
                        excluded=excluded, live=live)

    def match(
        self,
        user: UserFeatures,
        domain: int,
        k: int,
        *,
        exclude_rows: np.ndarray | None = None,
        entity_types: Sequence[int] | None = None,
        deadline: float | None = None,
        mode: str | None = None,
        params: SearchParams | None = None,
    ) -> MatchResult:
        """Top-``k`` entity rows of ``domain`` for ``user``, best first (score desc, then row asc):
        ``run(query(...))``, for callers that hold no query yet (benchmarks, the calibration)."""
        q = self.query(user, domain, k, exclude_rows=exclude_rows, entity_types=entity_types, deadline=deadline)
        return self.run(q, mode=mode, params=params)

    @property
    def active_searches(self) -> int:
        """Requests being searched now (``run``, ``match_many``'s lockstep: one each), background scans
        not counted; read without the lock: a hint."""
        return self.activity.in_flight

    def run(self, q: MatchQuery, *, mode: str | None = None, params: SearchParams | None = None,
            between_chunks: Callable[[], None] | None = None) -> MatchResult:
        """Answer a validated query. ``mode`` forces "graph" or "exhaustive" (benchmarks); by default the
        bundle's calibration chooses mode and operating point, else ``params.exhaustive_threshold``.

        ``between_chunks`` makes it background work (the shadow monitor's exhaustive re-scoring): not
        counted in ``active_searches``, scored in ``background_chunk`` rows per call, and the callback
        runs before each call (it may wait for a free CPU, or raise to give up).
        """
        if between_chunks is not None:
            return self._run(q, mode, params, between_chunks)
        with self.activity:
            return self._run(q, mode, params, None)

    def _run(self, q: MatchQuery, mode: str | None, params: SearchParams | None,
             between_chunks: Callable[[], None] | None) -> MatchResult:
        t_start = time.perf_counter()
        user, domain, k = q.user, q.domain, q.k
        mode, p = self._plan(q, mode, params)
        graph = self.graph
        if mode == "graph" and graph is None:
            raise SearchError("graph search requested but the bundle has no graph (run `unimatch index build`)")
        ctx = self.scorer.encode(user.cat, user.num, user.seq, domain)
        t_enc = time.perf_counter()
        widened = False
        scorer = _TimedScore(self.scorer, ctx)
        layers: tuple[LayerStats, ...] = ()
        if mode == "graph" and graph is not None:
            keep = self._keep_fn(domain, q.entity_types, q.exclude_rows)

            def graph_search(p: SearchParams) -> SearchOutcome:
                return search(
                    graph, scorer, k=k, ef=p.ef, steps=p.steps, top_n=p.top_n, max_degree=p.max_degree,
                    whole_top_layer_up_to=p.whole_top_layer_up_to, visited=self._visited(), keep=keep,
                    deadline=q.deadline, seeds=self._seeds(user) if p.seed_history else None,
                    filter_beam=p.filter_beam, loop=self.search_loop,
                )

            out = graph_search(p)
            if p.ef[-1] < k and out.rows.size < k and not out.partial and q.eligible >= k:
                # A calibrated beam narrower than k saw fewer than k returnable rows (a request filtering
                # most of its domain away): search again as wide as k, as an uncalibrated search would.
                out = graph_search(replace(p, bottom_ef_floor=True).for_k(k))
                widened = True
            rows, scores, partial, steps = out.rows, out.scores, out.partial, out.steps
            layers = tuple(out.layers)
        else:
            rows, scores, partial, steps = self._exhaustive(scorer, domain, k, q.entity_types, q.exclude_rows, q.deadline,
                                                            between_chunks)
        t_end = time.perf_counter()
        stats = SearchStats(
            pair_evaluations=scorer.pairs,
            scorer_calls=scorer.calls,
            steps=int(steps),
            eligible=q.eligible,
            user_encode_ms=(t_enc - t_start) * 1e3,
            search_ms=(t_end - t_enc) * 1e3,
            scorer_ms=scorer.seconds * 1e3,
            gather_ms=scorer.gather_seconds * 1e3,
            total_ms=(t_end - t_start) * 1e3,
            layers=layers,
            widened=widened,
        )
        return MatchResult(rows=rows, scores=scores, mode=mode, partial=partial, stats=stats)

    def _plan(self, q: MatchQuery, mode: str | None, params: SearchParams | None) -> tuple[str, SearchParams]:
        """The mode and operating point of a validated query: the calibration's, else ``params``' (or the
        engine's) with ``exhaustive_threshold`` deciding the mode; ``mode`` forces one."""
        if mode is not None and mode not in MODES:
            raise SearchError(f"mode must be one of {MODES}, got {mode!r}")
        point = self.calibrated(q.domain, q.k) if params is None else None
        if point is not None:
            cal_mode, p = point
            mode = mode or cal_mode
        else:
            p = params_for_k(params or self.params, q.k)
            if mode is None:
                mode = "exhaustive" if self.bundle.graph is None or q.eligible <= p.exhaustive_threshold else "graph"
        if mode == "graph" and self.bundle.graph is None:
            raise SearchError("graph search requested but the bundle has no graph (run `unimatch index build`)")
        return mode, p

    def match_many(self, requests: Sequence[EngineRequest], *, merged: bool | None = None) -> list[MatchResult]:
        """Answer several requests at once: their graph searches run in lockstep (``service.lockstep``),
        one scorer call per step for all of them; the answer of each is ``match``'s.

        Every request is validated first (a ``SearchError`` for the first bad one, before any work).
        Exhaustive-mode requests are answered one by one. ``merged`` (default: True on a
        ``BatchingScorer``, the GPU path, else False) scores each step in ONE model call; without it each
        request's rows are scored in its own call, so its scores are exactly ``match``'s, and only the
        per-step bookkeeping is shared. A merged call may give a pair a score that differs in the last
        float bit (another batch shape), which can swap exact near-ties at the k-th place.

        Per-request stats: ``search_ms`` and ``total_ms`` are the lockstep's wall time (every request
        waits for the slowest); ``scorer_ms`` is the request's share (by pairs) of the calls it was in.
        """
        from service.lockstep import search_many

        t_start = time.perf_counter()
        queries = [self.query(r.user, r.domain, r.k, exclude_rows=r.exclude_rows, entity_types=r.entity_types,
                              deadline=r.deadline) for r in requests]
        plans = [self._plan(q, r.mode, r.params) for q, r in zip(queries, requests, strict=True)]
        params_given = [r.params for r in requests]
        if merged is None:
            merged = isinstance(self.scorer, BatchingScorer)
        results: list[MatchResult | None] = [None] * len(requests)
        graph = self.graph
        # The lockstep's compiled steps walk the CSR arrays and a live overlay's lists (``RequestBeam``).
        lockstep = graph is not None
        lock = [i for i, (mode, _) in enumerate(plans) if mode == "graph" and lockstep]
        for i, (mode, _) in enumerate(plans):
            if mode != "graph" or not lockstep:
                results[i] = self.run(queries[i], mode=mode, params=params_given[i])
        if lock and graph is not None:
            pool = self._visited_pool(len(lock))
            ctxs, encode_ms, beams = [], [], []
            for n, i in enumerate(lock):
                q, (_, p) = queries[i], plans[i]
                t0 = time.perf_counter()
                ctxs.append(self.scorer.encode(q.user.cat, q.user.num, q.user.seq, q.domain))
                encode_ms.append((time.perf_counter() - t0) * 1e3)
                beams.append(RequestBeam(
                    graph, k=q.k, ef=p.ef, steps=p.steps, top_n=p.top_n, max_degree=p.max_degree,
                    whole_top_layer_up_to=p.whole_top_layer_up_to, visited=pool[n],
                    keep=self._keep_fn(q.domain, q.entity_types, q.exclude_rows), deadline=q.deadline,
                    seeds=self._seeds(q.user) if p.seed_history else None, filter_beam=p.filter_beam,
                ))
            pairs = np.zeros(len(lock), dtype=np.int64)
            calls = np.zeros(len(lock), dtype=np.int64)
            ort_ms = np.zeros(len(lock))
            gather_ms = np.zeros(len(lock))

            def score_many(which: list[int], rows: list[np.ndarray]) -> list[np.ndarray]:
                out, g_s, o_s = self.scorer.score_many([ctxs[w] for w in which], rows, merged=bool(merged))
                sizes = np.array([r.size for r in rows], dtype=np.int64)
                share = sizes / max(int(sizes.sum()), 1)
                idx = np.asarray(which)
                pairs[idx] += sizes
                calls[idx] += 1
                ort_ms[idx] += share * o_s * 1e3
                gather_ms[idx] += share * g_s * 1e3
                return out

            t_search = time.perf_counter()
            with self.activity:  # one thread's work: one CPU taken, whatever the batch's size
                outs = search_many(beams, score_many)
            t_end = time.perf_counter()
            for n, (i, out) in enumerate(zip(lock, outs, strict=True)):
                stats = SearchStats(
                    pair_evaluations=int(pairs[n]), scorer_calls=int(calls[n]), steps=int(out.steps),
                    eligible=queries[i].eligible, user_encode_ms=encode_ms[n], search_ms=(t_end - t_search) * 1e3,
                    scorer_ms=float(ort_ms[n]), gather_ms=float(gather_ms[n]), total_ms=(t_end - t_start) * 1e3,
                    layers=tuple(out.layers), batch=len(lock),
                )
                results[i] = MatchResult(rows=out.rows, scores=out.scores, mode="graph", partial=out.partial, stats=stats)
                p, want = plans[i][1], queries[i].k
                short = out.rows.size < want <= queries[i].eligible and not out.partial
                if short and p.ef[-1] < want:  # as in run(): a narrow beam that saw too few returnable rows
                    again = self.run(queries[i], mode="graph", params=replace(p, bottom_ef_floor=True))
                    results[i] = replace(again, stats=replace(again.stats, widened=True))
        return [r for r in results if r is not None]

    def calibrated(self, domain: int, k: int) -> tuple[str, SearchParams] | None:
        """(mode, params) the calibration chose for this domain and k, or None (not calibrated).

        The smallest bucket >= k; above every bucket, the largest one's point with its bottom ef scaled
        by k (``Calibration.lookup``).
        """
        buckets = self._calibrated[domain] if 0 <= domain < len(self._calibrated) else []
        for bucket_k, mode, params, _ in buckets:
            if bucket_k >= k:  # stored as for_k(bucket_k): its bottom ef and top-n are already >= k
                return mode, params
        if not buckets or self.calibration is None:
            return None
        cached = self._above_buckets.get((domain, k))
        if cached is None:  # once per (domain, k): k is bounded by the service's max_k
            _, mode, params, pt = buckets[-1]
            _, ef_bottom = self.calibration.lookup(self.bundle.schema.domains[domain], k) or (pt, k)
            ef_bottom = ef_bottom if params.narrow else max(ef_bottom, k)
            cached = mode, replace(params, ef=(*params.ef[:-1], ef_bottom)).for_k(k)
            self._above_buckets[(domain, k)] = cached
        return cached

    def calibrated_point(self, domain: int, k: int) -> CalibratedPoint | None:
        """The stored calibration point that serves (domain, k): its measured coverage is the yardstick."""
        buckets = self._calibrated[domain] if 0 <= domain < len(self._calibrated) else []
        for bucket_k, _, _, pt in buckets:
            if bucket_k >= k:
                return pt
        return buckets[-1][3] if buckets else None

    @staticmethod
    def _seeds(user: UserFeatures) -> np.ndarray:
        seq = np.asarray(user.seq, dtype=np.int64)
        return np.unique(seq[seq >= 0])

    def _exhaustive(
        self,
        scorer: _TimedScore,
        domain: int,
        k: int,
        types: np.ndarray | None,
        excl: np.ndarray | None,
        deadline: float | None,
        between_chunks: Callable[[], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, bool, int]:
        """Score every eligible row in ``exhaustive_chunk`` chunks (``background_chunk`` with a
        ``between_chunks`` callback, run before each); the reference the graph search is measured by."""
        rows = self._domain_rows[domain]
        if self.live is not None:
            rows = np.concatenate([rows[self.live.live[rows]], self.live.overlay_rows(domain)])
        if types is not None:
            rows = rows[np.isin(self._etype[rows], types)]
        if excl is not None:
            rows = rows[~np.isin(rows, excl)]
        chunk = self.exhaustive_chunk if between_chunks is None else self.background_chunk
        got_rows, got_scores, partial, calls = [], [], False, 0
        for i in range(0, rows.size, chunk):
            if deadline is not None and calls and time.monotonic() >= deadline:
                partial = True
                break
            if between_chunks is not None:
                between_chunks()
            part = rows[i : i + chunk]
            got_rows.append(part)
            got_scores.append(scorer(part))
            calls += 1
        if not got_rows:
            return np.empty(0, np.int64), np.empty(0, np.float32), partial, 0
        top_rows, top_scores = best_first(np.concatenate(got_rows), np.concatenate(got_scores), k)
        return top_rows, top_scores.astype(np.float32), partial, calls

    def eligible_count(self, domain: int, entity_types: Sequence[int] | None = None) -> int:
        """Entities eligible in ``domain`` (optionally of these entity types)."""
        counts = self._type_counts[domain]
        return int(counts.sum() if entity_types is None else counts[np.asarray(list(entity_types), dtype=np.int64)].sum())

    # ---- operations --------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One cold-start request per domain and mode: first-call allocations happen before traffic."""
        user = UserFeatures.cold_start(self.bundle.schema)
        searched = False
        for d in range(self._num_domains):
            eligible = int(self._type_counts[d].sum())
            if eligible == 0:
                continue
            k = min(10, eligible)
            r = self.match(user, d, k, mode="exhaustive" if self.bundle.graph is None else None)
            if not searched and self.bundle.graph is not None and r.mode != "graph":
                # the search's compiled kernels load (or compile, seconds) on their first call: not in a request
                self.match(user, d, k, mode="graph")
            searched = searched or self.bundle.graph is not None

    def close(self) -> None:
        """Release background resources (the GPU batcher thread, when there is one)."""
        close = getattr(self.scorer, "close", None)
        if close is not None:
            close()

    def info(self) -> dict:
        g = self.bundle.graph
        return {
            "provider": self.provider,
            "intra_op_threads": self.intra_op_threads,
            "scorer": type(self.scorer).__name__,
            "search_params": asdict(self.params),
            "calibration": None if self.calibration is None else self.calibration.summary(),
            "calibration_note": self.bundle.calibration_note
            if self.calibration is not None or self.bundle.calibration is None
            else "calibration present but overridden by explicit search parameters (UNIMATCH_SEARCH_*)",
            "graph": None
            if g is None
            else {"layers": g.num_layers, "nodes_per_layer": g.nodes_per_layer(), "entry_points": int(np.size(g.entry_points))},
            "num_entities": self.bundle.num_entities,
            "eligible_per_domain": {n: int(self._type_counts[d].sum()) for d, n in enumerate(self.bundle.schema.domains)},
            "bundle_version": self.bundle.version,
            "kind": self.bundle.kind,
            "live": self.live.info() if self.live is not None else None,
        }
