"""NANN-style beam search over the bundle's 4-layer HNSW graph, scored by the model itself.

Paper section IV-B: "we use model scoring and HNSW's greedy search algorithm to select the top-n
results with the highest scores in each layer, and finally merge these top candidate sets and select
the top-k ones with the highest scores". The search is NANN's (Chen et al., CIKM 2022)::

    K-NN-SEARCH(u, G, K, {ef_l}, {T_l}):
      ep <- entry points; for l = top .. 0: W <- SEARCH-LAYER(u, ep, ef_l, l, T_l); ep <- W
      return top-K by score over the merged per-layer results
    SEARCH-LAYER(u, ep, ef, l, T):
      S = C = W = ep
      repeat T times (stop early if C is empty):
        N <- (layer-l neighbours of every node in C) - S;  S <- S u N
        score all of N with the model in ONE batch
        W <- top-ef of (W u N);  C <- W n N

Three implementations of one search. ``fused_search`` (the default, ``search(loop="fused")``) keeps a
request's whole state in preallocated arrays and makes ONE compiled call per model call
(``search_kernels.fused_step``: beam update, expansion, and at a layer's end its top-n and the next
layer's entry), so that the Python left per step is the model call itself. ``RequestBeam``
(``loop="compiled"``) is the per-request state machine it replaced, one compiled call per step plus
Python per step and per layer; it is also what the batched lockstep search (``service.lockstep``)
drives for many requests at once. The numpy reference (``loop="numpy"``) is split like datasketch's
pure-Python HNSW: ``entry`` -> ``search_layer`` (which calls ``expand``) per layer -> ``merge``. Names
follow the HNSW paper (``M``, ``ef``); ``T`` is NANN's number of expansion steps. Both work over a graph
and a ``score(rows) -> scores`` callable: no Python loop over candidates, no onnxruntime, no torch.

Ordering conventions (used throughout): "best first" means score descending, ties broken by the
smaller row. Beams (W) are kept unordered; only results handed back are sorted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.graph import Graph
from service import search_kernels as kern
from service.hugepages import huge_zeros

ScoreFn = Callable[[np.ndarray], np.ndarray]  # (n,) int64 rows -> (n,) float32 scores, one model call
KeepFn = Callable[[np.ndarray], np.ndarray]  # (n,) int64 rows -> (n,) bool: may this row be returned?


@dataclass(frozen=True)
class LiveGraph(Graph):
    """The bundle's graph with the live catalogue's overlay (``service.overlay``): rows inserted online,
    appended after the E base rows, and edited neighbour lists; ``expand`` and ``entry`` walk base and
    overlay as one graph. The on-disk ``Graph`` stays the contracts' format; this is serving state."""

    overlay: Any = None


def overlay_of(graph: Graph) -> Any:
    """The live overlay of ``graph``, or None for a plain bundle graph."""
    return getattr(graph, "overlay", None)


_STAMP_MAX = int(np.iinfo(np.uint32).max)


class VisitedSet:
    """O(visited) per-request bookkeeping: generation-stamped arrays, reused by one thread.

    ``scored`` stamps + a score cache: a node is scored at most once per request, whatever layer
    sees it again (the upper layers' nodes reappear in every lower layer). ``seen`` stamps: NANN's
    per-layer set S. Starting a request or a layer bumps a generation counter instead of clearing
    an (E,) array, so the cost per request is proportional to the nodes touched, not the catalogue.
    Not thread-safe: keep one per worker thread.
    """

    def __init__(self, num_nodes: int, *, huge_pages: bool = False) -> None:
        # ``huge_pages``: the arrays in transparent huge pages (``service.hugepages``: a random row's read
        # then rarely misses the TLB too; an engine option, ``MatchEngine(huge_pages=True)``).
        zeros = huge_zeros if huge_pages else np.zeros
        self._scored = zeros((num_nodes,), np.uint32)
        self._seen = zeros((num_nodes,), np.uint32)
        self._slot = zeros((num_nodes,), np.int32)  # scratch for O(n) de-duplication
        self._cache = zeros((num_nodes,), np.float32)
        self._req = 0
        self._layer = 0
        self.fused: Any = None  # FusedBuffers of ``fused_search``, made on first use

    def __len__(self) -> int:
        return int(self._scored.shape[0])

    def new_request(self) -> None:
        self._req += 1
        if self._req >= _STAMP_MAX:  # wrap-around: the one O(E) reset every 4e9 requests
            self._scored[:] = 0
            self._req = 1
        self.new_layer()

    def new_layer(self) -> None:
        self._layer += 1
        if self._layer >= _STAMP_MAX:
            self._seen[:] = 0
            self._layer = 1

    def reserve_layers(self, n: int) -> int:
        """``n`` fresh layer stamps at once (for ``fused_search``): layer i uses the returned stamp + i."""
        if self._layer + n >= _STAMP_MAX:
            self._seen[:] = 0
            self._layer = 0
        first = self._layer + 1
        self._layer += n
        return first

    def unseen(self, rows: np.ndarray) -> np.ndarray:
        """Rows not yet seen in this layer, de-duplicated (first occurrence order kept), now marked seen."""
        rows = rows[self._seen[rows] != self._layer]
        if rows.size == 0:
            return rows
        pos = np.arange(rows.size, dtype=np.int32)
        self._slot[rows[::-1]] = pos[::-1]  # reversed, so the first occurrence's position is what remains
        rows = rows[self._slot[rows] == pos]
        self._seen[rows] = self._layer
        return rows

    def scores_of(self, rows: np.ndarray, score: ScoreFn) -> np.ndarray:
        """Scores of ``rows`` (unique): cached ones looked up, the rest scored in ONE ``score`` call."""
        fresh = self._scored[rows] != self._req
        if fresh.any():
            new = rows[fresh]
            self._cache[new] = score(new)
            self._scored[new] = self._req
        return self._cache[rows]


@dataclass
class LayerStats:
    layer: int
    steps: int = 0
    seen: int = 0  # nodes in this layer's S
    ms: float = 0.0


@dataclass
class SearchOutcome:
    rows: np.ndarray  # (k',) int64 best first
    scores: np.ndarray  # (k',) float32
    partial: bool
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.layers)


def best_first(rows: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best of (rows, scores), sorted best first (score desc, then row asc)."""
    if rows.size > n:
        # argpartition first: O(len) to cut to a little more than n, then an exact sort of the head.
        cut = np.argpartition(-scores, n - 1)[:n]
        thr = scores[cut].min()
        head = np.flatnonzero(scores >= thr)  # keeps every row tied with the n-th, so ties sort by row
        rows, scores = rows[head], scores[head]
    order = np.lexsort((rows, -scores))[:n]
    return rows[order], scores[order]


def entry(graph: Graph, *, whole_top_layer_up_to: int) -> np.ndarray:
    """Entry set of the top layer, ascending rows.

    NANN scores the whole top layer as the entry set when it is small: with ``whole_top_layer_up_to``
    >= its node count that is what we do; otherwise the graph's own entry points.
    """
    overlay = overlay_of(graph)
    top = graph.top_layer_nodes if overlay is None else overlay.top_layer_nodes()
    if 0 < top.size <= whole_top_layer_up_to:
        return top
    return np.unique(np.asarray(graph.entry_points, dtype=np.int64))


def expand(graph: Graph, layer: int, frontier: np.ndarray, max_degree: int = 0) -> np.ndarray:
    """Concatenated layer-``layer`` neighbour lists of ``frontier`` (frontier order, then adjacency order).

    Vectorised CSR gather: one ``np.repeat`` + ``arange`` builds every index, no loop over nodes.
    May contain duplicates and already-seen nodes; ``VisitedSet.unseen`` removes them. ``max_degree``
    > 0 takes only the first ``max_degree`` neighbours of each node: ``unimatch index build`` stores
    every list nearest first (hnswlib's own order is farthest first), so the cap keeps the closest edges
    and cuts the pairs per step.
    """
    overlay = overlay_of(graph)
    if overlay is not None:  # base CSR lists + the overlay's rows and edited lists
        return overlay.expand(layer, frontier, max_degree)
    off = graph.offsets[layer]
    starts = np.asarray(off[frontier], dtype=np.int64)
    lens = np.asarray(off[frontier + 1], dtype=np.int64) - starts
    if max_degree > 0:
        lens = np.minimum(lens, max_degree)
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    base = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    return np.asarray(graph.neighbors[layer][base + np.arange(total, dtype=np.int64)], dtype=np.int64)


def search_layer(
    graph: Graph,
    layer: int,
    ep_rows: np.ndarray,
    *,
    ef: int,
    steps: int,
    score: ScoreFn,
    visited: VisitedSet,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_degree: int = 0,
    prefer: KeepFn | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, LayerStats, bool]:
    """NANN's SEARCH-LAYER from the entry set ``ep_rows`` (unique rows).

    Returns ``(W_rows, W_scores, S_rows, S_scores, stats, partial)``: the beam (top-``ef`` of every
    node seen, unordered), every node seen in this layer with its score (unordered; the per-layer
    top-n is taken from it), and whether the deadline stopped the layer early.

    ``prefer`` (the request's returnable rows): the beam ranks every preferred node above every other,
    so nodes that can never be returned (another domain's, excluded) fill the beam only while fewer
    than ``ef`` returnable ones have been seen. Without it a filtered request's beam is shared with
    filtered-out nodes the model also scores high, and stops before it holds k returnable ones.
    """
    t0 = clock()
    stats = LayerStats(layer=layer)
    visited.new_layer()
    ep_rows = visited.unseen(np.asarray(ep_rows, dtype=np.int64))
    ep_scores = visited.scores_of(ep_rows, score)

    def rank_key(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if prefer is None:
            return scores
        # Float64, so the offset never swallows score differences; ordering within each group is kept.
        return np.where(prefer(rows), scores.astype(np.float64), scores.astype(np.float64) - 1e9)

    w_rows, w_scores = ep_rows, ep_scores
    w_keys = rank_key(ep_rows, ep_scores)
    if w_rows.size > ef:  # the beam never holds more than ef
        keep = np.argpartition(-w_keys, ef - 1)[:ef]
        w_rows, w_scores, w_keys = w_rows[keep], w_scores[keep], w_keys[keep]
    seen_rows, seen_scores = [ep_rows], [ep_scores]
    frontier = w_rows
    partial = False
    for _ in range(steps):
        if frontier.size == 0:
            break
        if deadline is not None and clock() >= deadline:
            partial = True
            break
        new = visited.unseen(expand(graph, layer, frontier, max_degree))
        stats.steps += 1
        if new.size == 0:
            frontier = new
            continue
        new_scores = visited.scores_of(new, score)
        seen_rows.append(new)
        seen_scores.append(new_scores)
        all_rows = np.concatenate([w_rows, new])
        all_scores = np.concatenate([w_scores, new_scores])
        all_keys = np.concatenate([w_keys, rank_key(new, new_scores)])
        if all_rows.size > ef:
            keep = np.argpartition(-all_keys, ef - 1)[:ef]
        else:
            keep = np.arange(all_rows.size)
        frontier = all_rows[keep[keep >= w_rows.size]]  # C <- W n N
        w_rows, w_scores, w_keys = all_rows[keep], all_scores[keep], all_keys[keep]
    s_rows, s_scores = np.concatenate(seen_rows), np.concatenate(seen_scores)
    stats.seen = int(s_rows.size)
    stats.ms = (clock() - t0) * 1e3
    return w_rows, w_scores, s_rows, s_scores, stats, partial


def merge(per_layer: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Union of the per-layer top-n lists (a row appears once), then the top-``k`` best first."""
    if not per_layer:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    rows = np.concatenate([r for r, _ in per_layer])
    scores = np.concatenate([s for _, s in per_layer])
    # Same row, same score in every layer (one request scores a node once): drop repeats.
    rows, first = np.unique(rows, return_index=True)
    return best_first(rows, scores[first], k)


class RequestBeam:
    """One request's K-NN-SEARCH as a state machine, advanced one expansion step at a time.

    The same search as ``search_layer`` + ``merge`` (NANN's SEARCH-LAYER per layer, top to bottom), with
    each step's bookkeeping in one compiled call (``service.search_kernels.advance``) and the model call
    left to whoever drives it: ``search`` drives one request, ``service.lockstep.search_many`` drives
    many and scores the rows all of them need at a step in one call. The protocol::

        while beam.next_layer():
            rows = beam.start_layer()              # the layer's entry set: rows that need scores
            while rows is not None:
                rows = beam.advance(score(rows))   # beam update, then the next step's rows (None: done)
            beam.end_layer()
        beam.outcome()

    The rows handed out are unique and never scored before by this request; an empty array needs no
    model call (``advance`` takes an empty score array). The beam's top-ef breaks ties by the smaller
    row, so the answer depends only on the scores, not on the order rows were produced or scored in.
    """

    def __init__(
        self,
        graph: Graph,
        *,
        k: int,
        ef: tuple[int, ...],
        steps: tuple[int, ...],
        top_n: tuple[int, ...],
        visited: VisitedSet,
        keep: KeepFn | None = None,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_degree: tuple[int, ...] = (),
        whole_top_layer_up_to: int | None = None,
        seeds: np.ndarray | None = None,
        filter_beam: bool = False,
    ) -> None:
        if not (len(ef) == len(steps) == len(top_n) == graph.num_layers):
            raise ValueError(f"ef, steps and top_n need one value per layer ({graph.num_layers})")
        if max_degree and len(max_degree) != graph.num_layers:
            raise ValueError(f"max_degree needs one value per layer ({graph.num_layers}) or none")
        self.graph, self.k, self.ef, self.steps, self.top_n = graph, int(k), ef, steps, top_n
        self.visited, self.keep, self.deadline, self.clock = visited, keep, deadline, clock
        self.degree = max_degree or (0,) * graph.num_layers
        self.seeds = None if seeds is None or not np.size(seeds) else np.asarray(seeds, dtype=np.int64)
        self.filter_beam = filter_beam
        visited.new_request()
        self._ep = entry(graph, whole_top_layer_up_to=ef[0] if whole_top_layer_up_to is None else whole_top_layer_up_to)
        self._i = -1  # index into the layers, top first
        self.partial = False
        self.layers: list[LayerStats] = []
        self._results: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def layer(self) -> int:
        return self.graph.num_layers - 1 - self._i

    def next_layer(self) -> bool:
        """Move to the next layer down; False when the search is over (bottom done, or deadline)."""
        if self.partial or self._i + 1 >= self.graph.num_layers:
            return False
        self._i += 1
        layer = self.layer
        self._t0 = self.clock()
        self._stats = LayerStats(layer=layer)
        self._prefer = self.keep is not None and self.filter_beam and layer == 0
        self._off, self._nb = _plain(self.graph.offsets[layer]), _plain(self.graph.neighbors[layer])
        self._overlay = overlay_of(self.graph)  # a live graph: the step walks the overlay's lists too
        self._t = 0
        self._w_rows, self._w_scores, self._w_keys = _EMPTY_ROWS, _EMPTY_SCORES, _EMPTY_KEYS
        self._seen_rows: list[np.ndarray] = []
        self._seen_scores: list[np.ndarray] = []
        self._seen_ok: list[np.ndarray] = []
        return True

    def start_layer(self) -> np.ndarray:
        """The layer's entry set (W of the layer above, plus the seeds at the bottom): the rows of it that
        need scores (the others were scored in a layer above)."""
        v = self.visited
        v.new_layer()
        ep = self._ep
        if self.layer == 0 and self.seeds is not None:
            ep = np.concatenate([np.asarray(ep, dtype=np.int64), self.seeds])
        return self._hand_out(kern.mark_unseen(np.asarray(ep, dtype=np.int64), v._seen, v._layer))

    def _hand_out(self, pending: np.ndarray) -> np.ndarray:
        v = self.visited
        self._pending = pending
        self._fresh = kern.take_fresh(pending, v._scored, v._req)
        self._ok = _NO_PREFERENCE
        if self._prefer and pending.size:  # the bottom layer's filtered beam: keep() once per row
            assert self.keep is not None
            self._ok = self.keep(pending)
        return self._fresh

    def advance(self, fresh_scores: np.ndarray) -> np.ndarray | None:
        """The scores of the rows last handed out: update the beam, take the next expansion step.

        Returns the rows the step after needs scored, or None when the layer is done (T steps taken,
        the frontier empty, nothing new reached, or the deadline passed: then ``partial``).
        """
        if fresh_scores.shape != self._fresh.shape:
            raise ValueError(f"expected {self._fresh.size} scores, got {np.shape(fresh_scores)}")
        v = self.visited
        past = self.deadline is not None and self.clock() >= self.deadline
        expand = self._t < self.steps[self._i] and not past
        if self._overlay is None:
            slot, adj = kern.NO_OVERLAY_SLOTS, kern.NO_OVERLAY_ADJ
        else:  # fetched each step: the writer may have grown the adjacency since the last one
            slot, adj = self._overlay.layer_arrays(self.layer)
        scores, self._w_rows, self._w_scores, self._w_keys, frontier, nxt, nxt_fresh = kern.advance(
            self._pending, self._fresh, np.asarray(fresh_scores, dtype=np.float32), self._ok, self._prefer,
            v._cache, self._w_rows, self._w_scores, self._w_keys, int(self.ef[self._i]), expand,
            self._off, self._nb, int(self.degree[self._i]), v._seen, v._layer, v._scored, v._req, slot, adj,
        )
        if self._pending.size:
            self._seen_rows.append(self._pending)
            self._seen_scores.append(scores)
            if self._prefer:
                self._seen_ok.append(self._ok)
        if frontier == 0:
            return None
        if not expand:
            self.partial = past and self._t < self.steps[self._i]
            return None
        self._t += 1
        self._stats.steps += 1
        if nxt.size == 0:  # the step reached nothing new: C is empty, the layer is done
            return None
        self._pending = nxt
        self._fresh = nxt_fresh
        self._ok = _NO_PREFERENCE
        if self._prefer:
            assert self.keep is not None
            self._ok = self.keep(nxt)
        return nxt_fresh

    def end_layer(self) -> None:
        """The layer's top-n of the returnable nodes it saw join the final merge; W enters the next layer."""
        s_rows = np.concatenate(self._seen_rows) if self._seen_rows else _EMPTY_ROWS
        s_scores = np.concatenate(self._seen_scores) if self._seen_scores else _EMPTY_SCORES
        self._stats.seen = int(s_rows.size)
        if self.keep is not None and s_rows.size:
            ok = np.concatenate(self._seen_ok) if self._prefer else self.keep(s_rows)
            s_rows, s_scores = s_rows[ok], s_scores[ok]
        if self.top_n[self._i] > 0 and s_rows.size:
            self._results.append(kern.best_first_kernel(s_rows, s_scores, int(self.top_n[self._i])))
        self._ep = self._w_rows
        self._stats.ms = (self.clock() - self._t0) * 1e3
        self.layers.append(self._stats)

    def outcome(self) -> SearchOutcome:
        if self._results:
            rows, scores = kern.merge_kernel(
                np.concatenate([r for r, _ in self._results]), np.concatenate([s for _, s in self._results]), self.k
            )
        else:
            rows, scores = _EMPTY_ROWS, _EMPTY_SCORES
        return SearchOutcome(rows=rows, scores=scores.astype(np.float32), partial=self.partial, layers=self.layers)


@dataclass(frozen=True)
class KeepRows:
    """A request's returnable rows as data (``search_kernels.keep_rows``'s arrays): callable like any
    ``KeepFn``, and what lets the fused loop filter inside its compiled step."""

    mask: np.ndarray  # (N,) uint64 domain bits per row
    bit: np.uint64  # the request's domain bit
    etype: np.ndarray  # (N,) int64 entity type per row
    type_ok: np.ndarray  # (num types,) bool, or empty: any type
    excluded: np.ndarray  # sorted int64 rows never returned, or empty
    live: np.ndarray  # (N,) bool the live catalogue's returnable flags, or empty: all

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        ok = kern.keep_rows(rows, self.mask, self.bit, self.etype, self.type_ok, self.excluded)
        if self.live.size:  # paused, deleted, superseded: never returned
            ok &= self.live[rows]
        return ok


_NO_KEEP = KeepRows(
    mask=np.zeros(0, np.uint64), bit=np.uint64(0), etype=np.zeros(0, np.int64), type_ok=np.zeros(0, np.bool_),
    excluded=np.zeros(0, np.int64), live=np.zeros(0, np.bool_),
)


class FusedBuffers:
    """One thread's preallocated arrays for ``fused_search`` (grown on demand, never shrunk)."""

    def __init__(self) -> None:
        self.st = np.zeros(kern.ST_SIZE, dtype=np.int64)
        self.cap_w = self.cap_p = self.cap_s = self.cap_r = -1
        self.ensure(1, 1, 1, 1)

    def ensure(self, cap_w: int, cap_p: int, cap_s: int, cap_r: int) -> None:
        if cap_w <= self.cap_w and cap_p <= self.cap_p and cap_s <= self.cap_s and cap_r <= self.cap_r:
            return
        self.cap_w, self.cap_p = max(cap_w, self.cap_w), max(cap_p, self.cap_p)
        self.cap_s, self.cap_r = max(cap_s, self.cap_s), max(cap_r, self.cap_r)
        i64, f32 = np.int64, np.float32
        self.ib = (np.empty(self.cap_w, i64), np.empty(self.cap_p, i64), np.empty(self.cap_p, i64),
                   np.empty(self.cap_s, i64), np.empty(self.cap_r, i64))
        self.fb = (np.empty(self.cap_w, f32), np.empty(self.cap_s, f32), np.empty(self.cap_r, f32))
        self.w_keys = np.empty(self.cap_w, np.float64)
        self.bb = (np.zeros(self.cap_p, np.bool_), np.zeros(self.cap_s, np.bool_))


_DEGREES: dict[int, tuple[Any, tuple[int, ...]]] = {}


def _list_lengths(graph: Graph) -> tuple[int, ...]:
    """Per layer, the longest CSR neighbour list (cached per graph: one O(E) pass each)."""
    key = id(graph.offsets[0])
    hit = _DEGREES.get(key)
    if hit is not None and hit[0] is graph.offsets[0]:
        return hit[1]
    lengths = tuple(int(np.diff(np.asarray(off)).max(initial=0)) for off in graph.offsets)
    _DEGREES[key] = (graph.offsets[0], lengths)
    return lengths


def fused_search(
    graph: Graph,
    score: ScoreFn,
    *,
    k: int,
    ef: tuple[int, ...],
    steps: tuple[int, ...],
    top_n: tuple[int, ...],
    visited: VisitedSet,
    keep: KeepRows | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_degree: tuple[int, ...] = (),
    whole_top_layer_up_to: int | None = None,
    seeds: np.ndarray | None = None,
    filter_beam: bool = False,
) -> SearchOutcome:
    """``RequestBeam``'s search with one compiled call per model call (``search_kernels.fused_step``):
    the same rows handed to ``score`` in the same order, the same answer, steps and seen counts; no
    per-step Python beyond the call and ``score`` itself. ``score`` gets a view of a reused buffer:
    it must not keep the array it is given."""
    num_layers = graph.num_layers
    if not (len(ef) == len(steps) == len(top_n) == num_layers):
        raise ValueError(f"ef, steps and top_n need one value per layer ({num_layers})")
    if max_degree and len(max_degree) != num_layers:
        raise ValueError(f"max_degree needs one value per layer ({num_layers}) or none")
    degree = max_degree or (0,) * num_layers
    overlay = overlay_of(graph)
    seeds = _EMPTY_ROWS if seeds is None or not np.size(seeds) else np.asarray(seeds, dtype=np.int64)
    ep = np.asarray(entry(graph, whole_top_layer_up_to=ef[0] if whole_top_layer_up_to is None else whole_top_layer_up_to),
                    dtype=np.int64)
    # Worst cases, so that no step outgrows its buffers: a step hands out at most |C| <= ef lists of at
    # most the layer's longest list; a layer entry at most the beam above (+ seeds); S at most all rows.
    lengths = _list_lengths(graph)
    width = max(overlay.layer_arrays(layer)[1].shape[1] for layer in range(num_layers)) if overlay is not None else 0
    n_rows = len(visited)
    cap_p = max(ep.size, max(ef) + seeds.size)
    cap_s = 0
    for i in range(num_layers):
        d = max(lengths[num_layers - 1 - i], width)
        if degree[i] > 0:
            d = min(d, int(degree[i]))
        cap_p = max(cap_p, int(ef[i]) * d)
        cap_s = max(cap_s, max(ep.size, max(ef) + seeds.size) + int(steps[i]) * int(ef[i]) * d)
    cap_p, cap_s = min(cap_p, n_rows), min(cap_s, n_rows)
    buf: FusedBuffers | None = getattr(visited, "fused", None)
    if buf is None:
        buf = visited.fused = FusedBuffers()
    buf.ensure(max(ef), cap_p, cap_s, sum(int(n) for n in top_n))
    lay = np.zeros((6, num_layers), dtype=np.int64)
    lay[kern.LAY_EF], lay[kern.LAY_STEPS], lay[kern.LAY_TOP_N], lay[kern.LAY_DEGREE] = ef, steps, top_n, degree
    visited.new_request()
    st = buf.st
    st[kern.ST_STAMP] = visited.reserve_layers(num_layers)
    st[kern.ST_REQ] = visited._req
    use_keep = keep is not None
    st[kern.ST_USE_KEEP], st[kern.ST_FILTER_BEAM] = use_keep, filter_beam
    kp = keep if keep is not None else _NO_KEEP
    mask, bit, etype, type_ok, excluded, live = kp.mask, kp.bit, kp.etype, kp.type_ok, kp.excluded, kp.live
    offs = tuple(_plain(graph.offsets[num_layers - 1 - i]) for i in range(num_layers))
    nbs = tuple(_plain(graph.neighbors[num_layers - 1 - i]) for i in range(num_layers))
    seen, scored, cache = visited._seen, visited._scored, visited._cache
    ib, fb, bb, w_keys = buf.ib, buf.fb, buf.bb, buf.w_keys
    fresh = ib[2]
    slot, adj = kern.NO_OVERLAY_SLOTS, kern.NO_OVERLAY_ADJ
    t0 = clock()
    n = kern.fused_begin(st, lay, ep, seeds, ib, bb, seen, scored, mask, bit, etype, type_ok, excluded, live)
    layer, marks = 0, [t0]
    while n >= 0:
        out = score(fresh[:n]) if n else _EMPTY_SCORES
        if out.shape != (n,):
            raise ValueError(f"expected {n} scores, got {np.shape(out)}")
        past = deadline is not None and clock() >= deadline
        if overlay is not None:  # fetched each step: the writer may have grown the adjacency since the last one
            slot, adj = overlay.layer_arrays(num_layers - 1 - layer)
        n = kern.fused_step(st, lay, out, past, seeds, ib, fb, w_keys, bb, seen, scored, cache, offs[layer], nbs[layer],
                            slot, adj, mask, bit, etype, type_ok, excluded, live)
        if st[0] != layer:  # ST_LAYER: a layer ended inside the call
            marks.append(clock())
            layer = int(st[0])
    marks.append(clock())
    layers = [
        LayerStats(layer=num_layers - 1 - i, steps=int(lay[kern.LAY_OUT_STEPS, i]), seen=int(lay[kern.LAY_OUT_SEEN, i]),
                   ms=(marks[i + 1] - marks[i]) * 1e3)
        for i in range(layer + 1)
    ]
    nr = int(st[kern.ST_NR])
    if nr:
        rows, scores = kern.merge_kernel(ib[4][:nr], fb[2][:nr], int(k))
    else:
        rows, scores = _EMPTY_ROWS, _EMPTY_SCORES
    return SearchOutcome(rows=rows, scores=scores, partial=bool(st[kern.ST_PARTIAL]), layers=layers)


_NO_PREFERENCE = np.zeros(0, dtype=np.bool_)
_EMPTY_ROWS = np.empty(0, dtype=np.int64)
_EMPTY_SCORES = np.empty(0, dtype=np.float32)
_EMPTY_KEYS = np.empty(0, dtype=np.float64)


def _plain(a: np.ndarray) -> np.ndarray:
    """A plain ndarray view (the kernels take ndarrays; ``np.memmap`` is a subclass)."""
    return a if type(a) is np.ndarray else np.asarray(a)


def _scored(score: ScoreFn, rows: np.ndarray) -> np.ndarray:
    return score(rows) if rows.size else np.empty(0, dtype=np.float32)


def search(
    graph: Graph,
    score: ScoreFn,
    *,
    k: int,
    ef: tuple[int, ...],
    steps: tuple[int, ...],
    top_n: tuple[int, ...],
    visited: VisitedSet,
    keep: KeepFn | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_degree: tuple[int, ...] = (),
    whole_top_layer_up_to: int | None = None,
    seeds: np.ndarray | None = None,
    filter_beam: bool = False,
    loop: str = "compiled",
) -> SearchOutcome:
    """K-NN-SEARCH: layers top to bottom, per-layer top-n of the returnable nodes, merged top-k.

    ``ef``, ``steps`` and ``top_n`` are per layer, top layer first (the order of SearchParams). The
    beam navigates through every node; only rows that ``keep`` accepts (domain, entity type, exclusions)
    enter the per-layer top-n, so filters never disconnect the graph. The entry set is the whole top
    layer when it has at most ``whole_top_layer_up_to`` nodes (default: ``ef[0]``), else the graph's
    entry points. ``seeds`` (rows, e.g. the user's own history) join the bottom layer's entry set, so the
    beam also starts from entities known to matter to this user (measured on amazon phone/electronic:
    +0.05 coverage@200 for 2.2x the pairs, docs/search-benchmark.md, "Why the beam stalled, and the
    fix"; a calibration option, off by default). With a deadline, the search stops at the first step boundary past it and returns the best found so
    far (``partial``). ``filter_beam`` ranks ``keep``'s rows first in the bottom layer's beam
    (``search_layer(prefer=...)``); the upper layers navigate on score alone.

    ``loop``: "fused" (``fused_search``: one compiled call per model call; needs ``keep`` None or a
    ``KeepRows``, else it runs the compiled loop), "compiled" (``RequestBeam``, the per-step bookkeeping
    in ``service.search_kernels``) or "numpy" (``search_layer``, the reference, kept for the benchmark's
    before/after and the tests). Fused and compiled hand the scorer the same batches in the same order
    and return the same answer bit for bit; numpy returns the same rows and scores, except where tied
    keys straddle a beam's ef-th place: the compiled beam keeps the smaller row, numpy's argpartition
    keeps either.
    """
    # The compiled step walks the CSR arrays and, on a live graph, the overlay's rows and edited lists.
    if loop == "fused" and (keep is None or isinstance(keep, KeepRows)):
        return fused_search(
            graph, score, k=k, ef=ef, steps=steps, top_n=top_n, visited=visited, keep=keep, deadline=deadline, clock=clock,
            max_degree=max_degree, whole_top_layer_up_to=whole_top_layer_up_to, seeds=seeds, filter_beam=filter_beam,
        )
    if loop in ("compiled", "fused"):  # fused with a keep callable it cannot compile: the compiled loop
        beam = RequestBeam(
            graph, k=k, ef=ef, steps=steps, top_n=top_n, visited=visited, keep=keep, deadline=deadline, clock=clock,
            max_degree=max_degree, whole_top_layer_up_to=whole_top_layer_up_to, seeds=seeds, filter_beam=filter_beam,
        )
        while beam.next_layer():
            rows: np.ndarray | None = beam.start_layer()
            while rows is not None:
                rows = beam.advance(_scored(score, rows))
            beam.end_layer()
        return beam.outcome()
    if loop != "numpy":
        raise ValueError(f"loop must be 'fused', 'compiled' or 'numpy', got {loop!r}")
    if not (len(ef) == len(steps) == len(top_n) == graph.num_layers):
        raise ValueError(f"ef, steps and top_n need one value per layer ({graph.num_layers})")
    if max_degree and len(max_degree) != graph.num_layers:
        raise ValueError(f"max_degree needs one value per layer ({graph.num_layers}) or none")
    degree = max_degree or (0,) * graph.num_layers
    visited.new_request()
    ep = entry(graph, whole_top_layer_up_to=ef[0] if whole_top_layer_up_to is None else whole_top_layer_up_to)
    results: list[tuple[np.ndarray, np.ndarray]] = []
    layer_stats: list[LayerStats] = []
    partial = False
    for i, layer in enumerate(range(graph.num_layers - 1, -1, -1)):
        if layer == 0 and seeds is not None and seeds.size:
            ep = np.concatenate([np.asarray(ep, dtype=np.int64), np.asarray(seeds, dtype=np.int64)])
        w_rows, _, s_rows, s_scores, stats, partial = search_layer(
            graph, layer, ep, ef=ef[i], steps=steps[i], score=score, visited=visited, deadline=deadline, clock=clock,
            max_degree=degree[i], prefer=keep if filter_beam and layer == 0 else None,
        )
        layer_stats.append(stats)
        if keep is not None and s_rows.size:
            ok = keep(s_rows)
            s_rows, s_scores = s_rows[ok], s_scores[ok]
        if top_n[i] > 0 and s_rows.size:
            results.append(best_first(s_rows, s_scores, top_n[i]))
        ep = w_rows
        if partial:
            break
    rows, scores = merge(results, k)
    return SearchOutcome(rows=rows, scores=scores.astype(np.float32), partial=partial, layers=layer_stats)
