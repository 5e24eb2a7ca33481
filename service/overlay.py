"""Online HNSW insertion into a mutable overlay above the memory-mapped CSR graph (live catalogue).

The serving graph (paper IV-B: a 4-layer HNSW over the entity vectors, searched NANN-style with the
model scoring every neighbour reached) is built offline and memory-mapped read-only. Entities that
arrive or change while serving are inserted here, with the HNSW paper's INSERT (Malkov & Yashunin,
Algorithm 1) and its neighbour-selection heuristic (Algorithm 4):

* a new node takes the next row after the base rows (row ``E + i`` for the i-th insertion), gets a
  level drawn from the base graph's own level distribution (so capped at the top of the 4 layers),
  descends greedily from the entry points to its level, and on each layer from there down searches
  the *current* graph (base + overlay) with ``ef_construction`` and keeps ``M`` neighbours chosen by
  the heuristic;
* every chosen neighbour links back; a list that would exceed its cap (2M on layer 0, M above) is
  pruned with the same heuristic over its candidates' distances from that neighbour.

A base node whose list changes gets an *override* row here (its CSR list copied, then edited); the
CSR arrays are never written. ``expand`` is the one hook the beam search calls: base CSR neighbours for
rows without an override, override / overlay rows for the rest. ``top_layer_nodes`` adds overlay
nodes of the top layer to the entry set.

Concurrency: one writer (the change applier, under its lock), any number of lock-free readers (the
search threads). A new node's row is complete before any edge to it is published, so a reader never
reaches a half-inserted node; an override row edited in place can be read mid-edit, which yields one
expansion over a mix of the old and new list, all of them valid nodes of that layer.

The insertion runs compiled (``service.overlay_kernels``, one call per batch, GIL released); the
numpy code here is its reference (``native=False``), kept for the tests and the before/after benchmark.
"""

from __future__ import annotations

import heapq
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from contracts.graph import Graph


class OverlayFull(RuntimeError):
    """The overlay has no row left: compact the change log into a new bundle (`unimatch index compact`)."""


def l2_rows(q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Squared L2 from ``q`` to each row of ``vectors`` (float64 values of float32 sums), in the compiled
    kernels' exact order (``service.overlay_kernels.l2_at``: dimension j into float32 partial sum j mod 8,
    then a fixed tree), so the reference and the compiled insertion see the same distances, ties included."""
    diff = np.asarray(vectors, dtype=np.float32) - np.asarray(q, dtype=np.float32)
    sq = diff * diff
    acc = np.zeros((8, sq.shape[0]), dtype=np.float32)
    for j in range(sq.shape[1]):
        acc[j % 8] += sq[:, j]
    return (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))).astype(np.float64)


def heuristic(rows: np.ndarray, dist: np.ndarray, vectors: np.ndarray, m: int) -> np.ndarray:
    """HNSW's SELECT-NEIGHBORS-HEURISTIC (Algorithm 4, no extension, pruned ones not kept back).

    ``rows`` are candidates with squared L2 ``dist`` to the base element and their ``vectors``. Nearest
    first (stable), a candidate is kept when it is closer to the base element than to every candidate
    kept so far (hnswlib's ``getNeighborsByHeuristic2``). Returns at most ``m`` rows, nearest first.
    The numpy reference of ``overlay_kernels.heuristic_kernel`` (same distances, same decisions).
    """
    order = np.argsort(dist, kind="stable")
    rows, dist, vectors = rows[order], dist[order], vectors[order]
    if rows.size <= m:
        return rows
    kept: list[int] = []
    for i in range(rows.size):
        if kept and (l2_rows(vectors[i], vectors[kept]) < dist[i]).any():
            continue
        kept.append(i)
        if len(kept) == m:
            break
    return rows[np.asarray(kept, dtype=np.int64)]


def _readonly(a: np.ndarray, dtype: type) -> np.ndarray:
    """A C-contiguous read-only view (a copy only if the dtype or layout differ): the compiled kernels
    take the base graph's arrays as one tuple type per layer, which needs them all typed alike."""
    v: np.ndarray = np.ascontiguousarray(np.asarray(a), dtype=dtype).view()
    v.flags.writeable = False
    return v


class GraphOverlay:
    """Overlay rows and override lists above a base ``Graph``; see the module docstring.

    State, preallocated for ``capacity`` rows (the compiled kernels and the numpy reference share it):
    ``_slot`` (layers, E + capacity) int32, the slot of a row's list on a layer (-1: the CSR list / none);
    ``_adj[layer]`` (slots, cap) int32 lists, -1 padded; ``_used[layer]`` slots taken. ``native``
    selects the compiled insertion (default) or the numpy reference (tests, before/after benchmarks).
    """

    def __init__(
        self, base: Graph, base_vectors: np.ndarray, *, capacity: int, M: int, ef_construction: int = 100,
        seed: int = 0, native: bool = True,
    ) -> None:
        if capacity < 0 or M < 2 or ef_construction < 1:
            raise ValueError(f"capacity >= 0, M >= 2 and ef_construction >= 1 needed, got {capacity}, {M}, {ef_construction}")
        self.base = base
        self.E = base.num_nodes
        self.capacity = int(capacity)
        self.layers = base.num_layers
        self.M = int(M)
        self.native = bool(native)
        # hnswlib's caps: 2M on the bottom layer, M above (the HNSW paper's M_max0 = 2 M_max)
        self.max_degree = [2 * self.M] + [self.M] * (self.layers - 1)
        self.ef_construction = int(ef_construction)
        self._base_vectors = _readonly(base_vectors, np.float32)
        dim = int(self._base_vectors.shape[1])
        self._vectors = np.zeros((self.capacity, dim), dtype=np.float32)
        self._vectors_ro = self._vectors.view()
        self._vectors_ro.flags.writeable = False
        self.levels = np.full(self.capacity, -1, dtype=np.int8)  # level of overlay row E + i
        self.count = 0  # overlay rows inserted so far
        total = self.E + self.capacity
        self._slot = np.full((self.layers, total), -1, dtype=np.int32)
        # Slots: the new rows of a layer plus the base rows whose list changed (~M per insertion on layer
        # 0 until most base rows near the inserts have one); grown by doubling when a batch could overflow.
        self._adj = [np.full((max(64, self.capacity // 4), d), -1, dtype=np.int32) for d in self.max_degree]
        self._used = np.zeros(self.layers, dtype=np.int64)
        self._top: np.ndarray = np.empty(0, dtype=np.int64)  # overlay rows on the top layer, ascending
        self.overrides = 0  # base rows whose list the overlay replaced (all layers)
        self.insert_s = 0.0  # wall seconds spent in insertions (a benchmark's split of the writer's time)
        # the base graph's level distribution: P(level >= l), drawn from for new nodes
        lv = np.asarray(base.levels)
        self._p_level = np.array([float((lv >= layer).mean()) if lv.size else 0.0 for layer in range(self.layers)])
        self._rng = np.random.default_rng(seed)
        self._stamp = np.zeros(total, dtype=np.uint32)  # writer-only visited stamps of the construction search
        self._gen = np.zeros(1, dtype=np.uint32)
        self._sink = np.zeros(1, dtype=np.float32)  # the kernels' cache-touching loads write here
        self._offsets = tuple(_readonly(o, np.int64) for o in base.offsets)
        self._neighbors = tuple(_readonly(n, np.int32) for n in base.neighbors)
        self._entry = np.unique(np.asarray(base.entry_points, dtype=np.int64))
        self._max_degree = np.asarray(self.max_degree, dtype=np.int64)

    # ---- readers (search threads) -------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.E + self.count

    def top_layer_nodes(self) -> np.ndarray:
        """The top layer's rows, base and overlay, ascending (the search's entry set)."""
        top = self._top
        base_top = self.base.top_layer_nodes
        return base_top if top.size == 0 else np.concatenate([base_top, top])

    def layer_arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, adjacency) of ``layer`` for the compiled search step (``search_kernels.advance``).
        The slot array is fixed; the adjacency may be replaced by a bigger copy (``_reserve``) before a
        slot in the new part is published, so a step holding the older array bounds-checks each slot
        against it and reads a slot beyond it as unset (the CSR list, or none: stale, never invalid)."""
        return self._slot[layer], self._adj[layer]

    def expand(self, layer: int, frontier: np.ndarray, max_degree: int = 0) -> np.ndarray:
        """Layer-``layer`` neighbours of ``frontier`` over base + overlay (``search.expand``'s contract)."""
        from service.search import expand as csr_expand

        slot = self._slot[layer]
        adj = self._adj[layer]  # read before the slots: a slot beyond it (grown since) counts as unset
        slots = slot[frontier]
        over = (slots >= 0) & (slots < adj.shape[0])
        if not over.any():
            if self.count == 0:
                return csr_expand(self.base, layer, frontier, max_degree)
            return csr_expand(self.base, layer, frontier[frontier < self.E], max_degree)
        o = adj[slots[over]]  # (n, cap)
        if max_degree > 0:
            o = o[:, :max_degree]
        o = o[o >= 0].astype(np.int64)
        plain = frontier[~over & (frontier < self.E)]
        if plain.size == 0:
            return o
        return np.concatenate([csr_expand(self.base, layer, plain, max_degree), o])

    def neighbours(self, layer: int, row: int) -> np.ndarray:
        """The current list of ``row`` on ``layer`` (override / overlay row, else the CSR row)."""
        s = int(self._slot[layer][row])
        if s >= 0:
            lst = self._adj[layer][s]
            return lst[lst >= 0].astype(np.int64)
        if row >= self.E:
            return np.empty(0, dtype=np.int64)
        off = self.base.offsets[layer]
        return np.asarray(self.base.neighbors[layer][off[row] : off[row + 1]], dtype=np.int64)

    def level_of(self, row: int) -> int:
        return int(self.base.levels[row]) if row < self.E else int(self.levels[row - self.E])

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.count == 0 or rows.size == 0 or rows.max() < self.E:
            return np.asarray(self._base_vectors[rows], dtype=np.float32)
        out = np.take(self._base_vectors, np.minimum(rows, self.E - 1), axis=0).astype(np.float32, copy=False)
        over = rows >= self.E
        out[over] = self._vectors[rows[over] - self.E]
        return out

    # ---- the writer ---------------------------------------------------------------------------------
    def draw_level(self) -> int:
        """A level with the base graph's distribution: P(level >= l) as measured over its nodes."""
        u = self._rng.random()
        level = 0
        for layer in range(1, self.layers):
            if u < self._p_level[layer]:
                level = layer
        return level

    def insert(self, vector: np.ndarray, level: int | None = None) -> int:
        """HNSW INSERT of one new node; returns its row (``E + i``). The caller fills its tables first."""
        levels = None if level is None else [int(level)]
        return int(self.insert_many(np.asarray(vector, dtype=np.float32).reshape(1, -1), levels)[0])

    def insert_many(self, vectors: np.ndarray, levels: list[int] | None = None) -> np.ndarray:
        """HNSW INSERT of new nodes in order (each searches the graph the ones before it made); returns
        their rows. Compiled: one call for the whole batch, the GIL released (``overlay_kernels``)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        n = int(vectors.shape[0])
        if self.count + n > self.capacity:
            raise OverlayFull(f"the overlay holds {self.capacity} rows; compact the change log into a new bundle")
        lv = [self.draw_level() for _ in range(n)] if levels is None else [int(x) for x in levels]
        if len(lv) != n or any(not 0 <= x < self.layers for x in lv):
            raise ValueError(f"levels must be {n} values in 0..{self.layers - 1}, got {lv}")
        t0 = time.perf_counter()
        i0 = self.count
        rows = np.arange(self.E + i0, self.E + i0 + n, dtype=np.int64)
        self._vectors[i0 : i0 + n] = vectors
        self.levels[i0 : i0 + n] = lv
        if self.native:
            from service import overlay_kernels as ok

            level_arr = np.asarray(lv, dtype=np.int64)
            for layer in range(self.layers):  # room for each node's own list and M edited lists per layer
                self._reserve(layer, int((level_arr >= layer).sum()) * (self.M + 1))
            if int(self._gen[0]) + n * self.layers + 1 >= np.iinfo(np.uint32).max:
                self._stamp[:] = 0
                self._gen[0] = 0
            self.overrides += int(ok.insert_batch(
                rows, level_arr, self._entry, self._max_degree, self.M, self.ef_construction, self._base_vectors,
                self._vectors_ro, self.E, self._offsets, self._neighbors, self._slot, tuple(self._adj), self._used,
                self._stamp, self._gen, self._sink,
            ))
            self.count = i0 + n
        else:
            for t in range(n):
                self._insert_reference(int(rows[t]), lv[t])
        top = rows[np.asarray(lv) == self.layers - 1]
        if top.size:
            self._top = np.concatenate([self._top, top]).astype(np.int64)
        self.insert_s += time.perf_counter() - t0
        return rows

    def _reserve(self, layer: int, slots: int) -> None:
        adj = self._adj[layer]
        need = int(self._used[layer]) + slots
        if need <= adj.shape[0]:
            return
        size = adj.shape[0]
        while size < need:
            size *= 2
        # copy, then swap the reference before any new slot is published
        bigger = np.full((size, adj.shape[1]), -1, dtype=np.int32)
        bigger[: adj.shape[0]] = adj
        self._adj[layer] = bigger

    def _insert_reference(self, row: int, level: int) -> None:
        """The numpy reference of ``overlay_kernels.insert_batch`` for one node (its vector stored)."""
        q = self._vectors[row - self.E]
        ep = self._entry
        ep_d = self._dist(q, ep)
        for layer in range(self.layers - 1, level, -1):  # greedy descent (ef = 1) above the node's level
            ep, ep_d = self._search_layer(q, ep, ep_d, 1, layer)
        links: list[tuple[int, np.ndarray]] = []
        for layer in range(level, -1, -1):
            w, w_d = self._search_layer(q, ep, ep_d, self.ef_construction, layer)
            chosen = heuristic(w, w_d, self.vectors_of(w), self.M)
            links.append((layer, chosen))
            self._write_new(layer, row, chosen)
            ep, ep_d = w, w_d
        self.count = row - self.E + 1  # the node is complete: edges to it may now be published
        for layer, chosen in links:
            for e in chosen.tolist():
                self._link(layer, int(e), row, q)

    def _dist(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return l2_rows(q, self.vectors_of(rows))

    def _search_layer(self, q: np.ndarray, ep: np.ndarray, ep_d: np.ndarray, ef: int, layer: int
                      ) -> tuple[np.ndarray, np.ndarray]:
        """HNSW's SEARCH-LAYER (Algorithm 2) in L2 with heapq: candidates a min-heap, results a max-heap
        of at most ``ef``, both ordered by (distance, row). Returns the results nearest first."""
        if int(self._gen[0]) + 1 >= np.iinfo(np.uint32).max:
            self._stamp[:] = 0
            self._gen[0] = 0
        self._gen[0] += 1
        gen = self._gen[0]
        self._stamp[ep] = gen
        cand = [(float(d), int(r)) for d, r in zip(ep_d.tolist(), ep.tolist(), strict=True)]
        heapq.heapify(cand)
        res: list[tuple[float, int]] = []  # (-d, -row): the top is the farthest
        for d, r in zip(ep_d.tolist(), ep.tolist(), strict=True):
            heapq.heappush(res, (-float(d), -int(r)))
            if len(res) > ef:
                heapq.heappop(res)
        while cand:
            c = heapq.heappop(cand)
            if c > (-res[0][0], -res[0][1]):  # the nearest candidate is farther than the farthest result
                break
            nb = self.neighbours(layer, c[1])
            nb = nb[self._stamp[nb] != gen]
            self._stamp[nb] = gen
            for d, e in zip(self._dist(q, nb).tolist(), nb.tolist(), strict=True):
                if len(res) < ef or (d, e) < (-res[0][0], -res[0][1]):
                    heapq.heappush(cand, (d, e))
                    heapq.heappush(res, (-d, -e))
                    if len(res) > ef:
                        heapq.heappop(res)
        out = sorted((-d, -r) for d, r in res)
        return np.array([r for _, r in out], dtype=np.int64), np.array([d for d, _ in out], dtype=np.float64)

    def _new_slot(self, layer: int) -> int:
        self._reserve(layer, 1)
        s = int(self._used[layer])
        self._used[layer] = s + 1
        return s

    def _write_new(self, layer: int, row: int, lst: np.ndarray) -> None:
        s = self._new_slot(layer)
        self._adj[layer][s, : lst.size] = lst
        self._slot[layer][row] = s

    def _link(self, layer: int, e: int, new: int, q: np.ndarray) -> None:
        """Add the edge e -> new; prune e's list with the heuristic when it would exceed its cap."""
        cap = self.max_degree[layer]
        cur = self.neighbours(layer, e)
        s = int(self._slot[layer][e])
        if cur.size < cap:
            if s < 0:  # first change of a base row: copy its CSR list into an override row
                s = self._new_slot(layer)
                self._adj[layer][s, : cur.size] = cur
                self._adj[layer][s, cur.size] = new
                self._slot[layer][e] = s
                self.overrides += 1
            else:
                self._adj[layer][s, cur.size] = new  # one int32 store: readers see the list with or without it
            return
        cand = np.concatenate([cur, [new]])
        ve = self.vectors_of(np.array([e]))[0]
        vc = self.vectors_of(cand)
        kept = heuristic(cand, l2_rows(ve, vc), vc, cap)
        if s < 0:
            s = self._new_slot(layer)
            self._adj[layer][s, : kept.size] = kept
            self._slot[layer][e] = s
            self.overrides += 1
        else:
            row = np.full(cap, -1, dtype=np.int32)
            row[: kept.size] = kept
            self._adj[layer][s] = row

    # ---- compaction ---------------------------------------------------------------------------------
    def frozen_layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer`` over all ``num_nodes`` rows as CSR (offsets (N+1,) int64, neighbours int32)."""
        n = self.num_nodes
        off = self.base.offsets[layer]
        base_deg: np.ndarray = np.diff(np.asarray(off, dtype=np.int64))  # (E,)
        slots = self._slot[layer][:n]
        deg = np.zeros(n, dtype=np.int64)
        deg[: self.E] = base_deg
        has = slots >= 0
        adj = self._adj[layer]
        deg[has] = (adj[slots[has]] >= 0).sum(axis=1)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(deg, out=offsets[1:])
        out = np.empty(int(offsets[-1]), dtype=np.int32)
        plain = np.flatnonzero(~has[: self.E])
        if plain.size:
            from service.search import expand as csr_expand

            lens: np.ndarray = np.asarray(base_deg[plain], dtype=np.int64)
            dst = np.repeat(offsets[plain] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
            out[dst] = csr_expand(self.base, layer, plain.astype(np.int64))
        rows_h = np.flatnonzero(has)
        if rows_h.size:
            lists = adj[slots[rows_h]]  # (n, cap), -1 padded
            valid = lists >= 0
            lens = np.asarray(valid.sum(axis=1), dtype=np.int64)
            dst = np.repeat(offsets[rows_h] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
            out[dst] = lists[valid]
        return offsets, out
