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

Split like datasketch's pure-Python HNSW: ``entry`` -> ``search_layer`` (which calls ``expand``) per
layer -> ``merge``; ``search`` runs them. Names follow the HNSW paper (``M``, ``ef``); ``T`` is NANN's
number of expansion steps. Everything here is pure numpy over a graph and a ``score(rows) -> scores``
callable: no Python loop over candidates, no onnxruntime, no torch.

Ordering conventions (used throughout): "best first" means score descending, ties broken by the
smaller row. Beams (W) are kept unordered; only results handed back are sorted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

ScoreFn = Callable[[np.ndarray], np.ndarray]  # (n,) int64 rows -> (n,) float32 scores, one model call
KeepFn = Callable[[np.ndarray], np.ndarray]  # (n,) int64 rows -> (n,) bool: may this row be returned?


@dataclass(frozen=True)
class HnswGraph:
    """The per-layer CSR adjacency of docs/bundle-format.md; node id == entity row, layer 0 = bottom."""

    levels: np.ndarray  # (E,) int8: node i is present in layers 0..levels[i]
    offsets: tuple[np.ndarray, ...]  # per layer l: (E+1,) int64, neighbours of i = neighbors[l][off[i]:off[i+1]]
    neighbors: tuple[np.ndarray, ...]  # per layer l: (nnz_l,) int32
    entry_points: np.ndarray  # (n,) int32, all on the top layer
    # Live catalogue (service/overlay.py): rows inserted online, appended after the E base rows, and
    # edited neighbour lists; ``expand`` and ``entry`` walk base and overlay as one graph.
    overlay: Any = None

    @property
    def num_layers(self) -> int:
        return len(self.offsets)

    @property
    def num_nodes(self) -> int:
        return int(self.levels.shape[0])

    def nodes_per_layer(self) -> list[int]:
        """Node count of each layer, bottom (layer 0) first."""
        lv = np.asarray(self.levels)
        return [int((lv >= layer).sum()) for layer in range(self.num_layers)]

    def layer_nodes(self, layer: int) -> np.ndarray:
        """(n,) int64 rows present in ``layer``, ascending."""
        return np.flatnonzero(np.asarray(self.levels) >= layer).astype(np.int64)

    @cached_property
    def top_layer_nodes(self) -> np.ndarray:
        """The top layer's rows, computed once per graph: a scan of ``levels`` is O(catalogue), and the
        entry set needs it on every request (0.37 ms of an 11 ms query at 1M before it was cached)."""
        return self.layer_nodes(self.num_layers - 1)


class VisitedSet:
    """O(visited) per-request bookkeeping: generation-stamped arrays, reused by one thread.

    ``scored`` stamps + a score cache: a node is scored at most once per request, whatever layer
    sees it again (the upper layers' nodes reappear in every lower layer). ``seen`` stamps: NANN's
    per-layer set S. Starting a request or a layer bumps a generation counter instead of clearing
    an (E,) array, so the cost per request is proportional to the nodes touched, not the catalogue.
    Not thread-safe: keep one per worker thread.
    """

    def __init__(self, num_nodes: int) -> None:
        self._scored = np.zeros(num_nodes, dtype=np.uint32)
        self._seen = np.zeros(num_nodes, dtype=np.uint32)
        self._slot = np.zeros(num_nodes, dtype=np.int32)  # scratch for O(n) de-duplication
        self._cache = np.zeros(num_nodes, dtype=np.float32)
        self._req = 0
        self._layer = 0

    def __len__(self) -> int:
        return int(self._scored.shape[0])

    def new_request(self) -> None:
        self._req += 1
        if self._req >= np.iinfo(np.uint32).max:  # wrap-around: the one O(E) reset every 4e9 requests
            self._scored[:] = 0
            self._req = 1
        self.new_layer()

    def new_layer(self) -> None:
        self._layer += 1
        if self._layer >= np.iinfo(np.uint32).max:
            self._seen[:] = 0
            self._layer = 1

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


def entry(graph: HnswGraph, *, whole_top_layer_up_to: int) -> np.ndarray:
    """Entry set of the top layer, ascending rows.

    NANN scores the whole top layer as the entry set when it is small: with ``whole_top_layer_up_to``
    >= its node count that is what we do; otherwise the graph's own entry points.
    """
    top = graph.top_layer_nodes if graph.overlay is None else graph.overlay.top_layer_nodes()
    if 0 < top.size <= whole_top_layer_up_to:
        return top
    return np.unique(np.asarray(graph.entry_points, dtype=np.int64))


def expand(graph: HnswGraph, layer: int, frontier: np.ndarray, max_degree: int = 0) -> np.ndarray:
    """Concatenated layer-``layer`` neighbour lists of ``frontier`` (frontier order, then adjacency order).

    Vectorised CSR gather: one ``np.repeat`` + ``arange`` builds every index, no loop over nodes.
    May contain duplicates and already-seen nodes; ``VisitedSet.unseen`` removes them. ``max_degree``
    > 0 takes only the first ``max_degree`` neighbours of each node: ``unimatch index build`` stores
    every list nearest first (hnswlib's own order is farthest first), so the cap keeps the closest edges
    and cuts the pairs per step.
    """
    if graph.overlay is not None:  # base CSR lists + the overlay's rows and edited lists
        return graph.overlay.expand(layer, frontier, max_degree)
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
    graph: HnswGraph,
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


def search(
    graph: HnswGraph,
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
    """
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
