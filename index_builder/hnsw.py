"""Build an exactly-L-layer HNSW graph with hnswlib and extract it into per-layer CSR arrays.

Paper section IV-B builds "a 4-layer HNSW graph structure" on the L2 distance of the entity vectors and
walks it with the model as the scorer. hnswlib draws each node's level as ``floor(-ln(U) * mL)``
(HNSW paper, Malkov & Yashunin 2018, section 4, "normalization factor" ``mL``), which yields about
``log_M(N)`` levels, not a fixed number. Two steps give exactly ``layers`` levels for any N:

1. **Level multiplier.** hnswlib does not expose ``mL`` to Python, but stores it as a double at byte 80 of
   its index file. We save an *empty* index, patch ``mL = (L-1) / ln(N/T)`` (expected top-layer size
   ``T = max(top_layer_min, N / M**(L-1))``, so the standard ``1/ln M`` for large N), load it and insert.
2. **Capping.** Levels above ``L-1`` (rare: the geometric tail) are clamped into layer ``L-1`` and their
   higher links dropped. This is sound because insertion links a node on *every* level from
   ``min(level, maxlevel)`` down to 0, so "all nodes of level >= L-1" is a proper HNSW layer that
   contains the entry point (the node of the highest level).

The graph is read back from hnswlib's ``save_index`` file through ``numpy.memmap`` (its pickle state,
``__getstate__``, copies the whole level-0 block: +0.5 GB at 1M, several GB at 10M). File layout
(hnswlib 0.8.0 ``HierarchicalNSW::saveIndex``): a 96-byte header, then ``N`` level-0 records of
``size_data_per_element`` bytes (uint32 link count in the low 16 bits, ``maxM0`` uint32 internal ids,
the vector, a uint64 label at ``label_offset``), then per element ``uint32 size`` followed by ``size``
bytes = ``level`` blocks of ``[uint32 count][maxM uint32 ids]``.

Finally :func:`repair_reachability` adds reverse edges so that every node of every layer is reachable
from the entry point by the descent the search performs (the build leaves ~0-2% unreachable).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contracts.graph import Graph
from index_builder.config import IndexConfig

# <offsetLevel0, max_elements, cur_element_count, size_data_per_element, label_offset, offsetData>
# <maxlevel (int), enterpoint_node (uint32)> <maxM, maxM0, M> <mult (double)> <ef_construction>
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_MULT_OFFSET = 80  # byte offset of the double mL in the header above
_ROW_CHUNK = 1 << 18  # level-0 records parsed per step: bounds the temporary copies (~100 MB at 64-d)
_INSERT_CHUNK = 20_000  # rows per add_items call: granularity of the progress bar

Progress = Callable[[int, int], None]


class IndexBuildError(ValueError):
    """The graph could not be built or read back as a valid L-layer HNSW."""


@dataclass(frozen=True)
class HnswFileHeader:
    offset_level0: int
    max_elements: int
    count: int
    size_data_per_element: int
    label_offset: int
    offset_data: int
    max_level: int
    entry_point: int
    max_m: int
    max_m0: int
    m: int
    mult: float
    ef_construction: int

    @classmethod
    def read(cls, path: Path) -> HnswFileHeader:
        with open(path, "rb") as fh:
            raw = fh.read(_HEADER.size)
        if len(raw) != _HEADER.size:
            raise IndexBuildError(f"{path}: truncated hnswlib index header ({len(raw)} bytes)")
        return cls(*_HEADER.unpack(raw))


def level_multiplier(n: int, M: int, layers: int, top_layer_min: int) -> float:
    """mL such that the expected top layer (level ``layers-1``) holds max(top_layer_min, n / M**(layers-1)) nodes.

    P(level >= l) = exp(-l / mL), so ``mL = (layers-1) / ln(n / T)``; with T = n / M**(layers-1) this is
    the HNSW default 1/ln(M). The ratio is floored at 2 so tiny catalogues still get a finite mL.
    """
    if layers == 1:
        return 0.0
    top = max(float(top_layer_min), n / float(M) ** (layers - 1))
    return (layers - 1) / math.log(max(n / top, 2.0))


def build_hnswlib(
    vectors: np.ndarray, cfg: IndexConfig, scratch: Path, *, mult: float | None = None, progress: Progress | None = None
) -> tuple[Any, Path]:
    """Insert ``vectors`` (row i gets label i) into an hnswlib L2 index with patched mL.

    Returns the live ``hnswlib.Index`` (for the health report's ``knn_query`` comparison) and its saved
    file in ``scratch`` (about N * (8 + 8*M + 4*D + 8) bytes), which the caller parses and deletes.
    """
    import hnswlib  # lazy: the service imports this package's graph module without hnswlib

    n, dim = vectors.shape
    mult = level_multiplier(n, cfg.M, cfg.layers, cfg.top_layer_min) if mult is None else mult
    empty = scratch / "empty.hnsw"
    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(max_elements=n, M=cfg.M, ef_construction=cfg.ef_construction, random_seed=cfg.seed)
    index.save_index(str(empty))
    del index
    header = HnswFileHeader.read(empty)
    if header.m != cfg.M or header.count != 0:
        raise IndexBuildError(f"{empty}: unexpected hnswlib header {header}; is hnswlib 0.8.x installed?")
    with open(empty, "r+b") as fh:
        fh.seek(_MULT_OFFSET)
        fh.write(struct.pack("<d", mult))
    index = hnswlib.Index(space="l2", dim=dim)
    index.load_index(str(empty), max_elements=n)
    empty.unlink()
    threads = cfg.threads if cfg.threads > 0 else -1  # hnswlib: -1 = all cores
    # The seed picks the insertion order; hnswlib's level generator after load_index has a fixed seed,
    # so the permutation is what assigns levels (and the graph) to rows.
    order = np.random.default_rng(cfg.seed).permutation(n)
    for start in range(0, n, _INSERT_CHUNK):
        rows = order[start : start + _INSERT_CHUNK]  # not sorted: the order *is* the seed's effect
        index.add_items(np.ascontiguousarray(vectors[rows], dtype=np.float32), rows, num_threads=threads)
        if progress is not None:
            progress(min(start + _INSERT_CHUNK, n), n)
    path = scratch / "graph.hnsw"
    index.save_index(str(path))
    return index, path


@dataclass(frozen=True)
class RawGraph:
    """The graph as hnswlib built it, in row (label) order, before capping."""

    levels: np.ndarray  # (N,) int32, uncapped
    offsets: list[np.ndarray]  # per level 0..max_level: (N+1,) int64
    neighbors: list[np.ndarray]  # per level: (nnz,) int32 rows
    entry_point: int  # row
    header: HnswFileHeader


def read_hnswlib_file(path: Path, n: int) -> RawGraph:
    """Parse an hnswlib 0.8 ``save_index`` file through a memmap into per-level CSR arrays in row order."""
    header = HnswFileHeader.read(path)
    size = path.stat().st_size
    rec = header.size_data_per_element
    level0_end = _HEADER.size + header.count * rec
    if header.count != n or header.offset_level0 != 0 or size < level0_end:
        raise IndexBuildError(f"{path}: expected {n} elements, header says {header.count} (file {size} bytes)")
    level0 = np.memmap(path, dtype=np.uint8, mode="r", offset=_HEADER.size, shape=(n, rec))
    m0, lo = header.max_m0, header.label_offset

    # Pass 1: label and neighbour count of every internal id.
    labels = np.empty(n, dtype=np.int64)
    counts0 = np.empty(n, dtype=np.int64)
    for a in range(0, n, _ROW_CHUNK):
        block = np.asarray(level0[a : a + _ROW_CHUNK])
        labels[a : a + len(block)] = block[:, lo : lo + 8].copy().view(np.uint64)[:, 0]
        head = block[:, 0:4].copy().view(np.uint32)[:, 0]
        if np.any(head >> 16 & 0xFF):
            raise IndexBuildError(f"{path}: index contains deleted elements")
        counts0[a : a + len(block)] = head & 0xFFFF
    if labels.min() != 0 or labels.max() != n - 1:
        raise IndexBuildError(f"{path}: labels are not the rows 0..{n - 1}")
    row_of = labels  # internal id -> row
    internal_of = np.full(n, -1, dtype=np.int64)
    internal_of[row_of] = np.arange(n)
    if np.any(internal_of < 0):
        raise IndexBuildError(f"{path}: duplicate labels")
    if counts0.max(initial=0) > m0:
        raise IndexBuildError(f"{path}: a level-0 link count exceeds maxM0={m0}")

    # Pass 2: scatter each node's level-0 links into its row's CSR slot, translated to rows.
    off0 = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts0[internal_of], out=off0[1:])
    nbr0 = np.empty(int(off0[-1]), dtype=np.int32)
    slot = np.arange(m0)
    for a in range(0, n, _ROW_CHUNK):
        block = np.asarray(level0[a : a + _ROW_CHUNK])
        ids = block[:, 4 : 4 + 4 * m0].copy().view(np.uint32)  # (B, maxM0)
        mask = slot[None, :] < counts0[a : a + len(block), None]
        dest = (off0[row_of[a : a + len(block)], None] + slot[None, :])[mask]
        nbr0[dest] = row_of[ids[mask].astype(np.int64)]
    del level0

    # Upper levels: variable-length records after the level-0 block. Most are empty (one zero word),
    # so jump between non-zero words instead of looping over all N records in Python.
    words = np.memmap(path, dtype=np.uint32, mode="r", offset=level0_end, shape=((size - level0_end) // 4,))
    block_words = header.max_m + 1
    nonzero = np.flatnonzero(words)
    levels = np.zeros(n, dtype=np.int32)
    starts = np.zeros(n, dtype=np.int64)  # word index of the first upper-level block of each internal id
    pos, elem = 0, 0  # invariant: the record starting at word ``pos`` belongs to internal id ``elem``
    while True:
        k = int(np.searchsorted(nonzero, pos, side="left"))
        nxt = int(nonzero[k]) if k < len(nonzero) else len(words)
        elem += nxt - pos  # records pos .. nxt-1 are empty (a single zero size word each)
        if nxt == len(words):
            break
        if elem >= n:
            raise IndexBuildError(f"{path}: more link-list records than the {n} elements")
        nbytes = int(words[nxt])
        if nbytes % (4 * block_words):
            raise IndexBuildError(f"{path}: corrupt link list of internal id {elem} ({nbytes} bytes)")
        levels[elem] = nbytes // (4 * block_words)
        starts[elem] = nxt + 1
        pos = nxt + 1 + nbytes // 4
        elem += 1
        if pos > len(words):
            raise IndexBuildError(f"{path}: link list of internal id {elem - 1} runs past the end of the file")
    if elem != n:
        raise IndexBuildError(f"{path}: found {elem} link-list records for {n} elements")
    if int(levels.max(initial=0)) != header.max_level:
        raise IndexBuildError(f"{path}: parsed max level {levels.max()} != header max level {header.max_level}")

    offsets, neighbors = [off0], [nbr0]
    for level in range(1, header.max_level + 1):
        members = np.flatnonzero(levels >= level)  # internal ids on this level
        at = starts[members] + (level - 1) * block_words
        table = np.asarray(words[at[:, None] + np.arange(block_words)[None, :]])  # (k, maxM+1)
        cnt = (table[:, 0] & 0xFFFF).astype(np.int64)
        if cnt.max(initial=0) > header.max_m:
            raise IndexBuildError(f"{path}: a level-{level} link count exceeds maxM={header.max_m}")
        counts = np.zeros(n, dtype=np.int64)
        counts[row_of[members]] = cnt
        off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=off[1:])
        mask = np.arange(header.max_m)[None, :] < cnt[:, None]
        dest = (off[row_of[members], None] + np.arange(header.max_m)[None, :])[mask]
        nbr = np.empty(int(off[-1]), dtype=np.int32)
        nbr[dest] = row_of[table[:, 1:][mask].astype(np.int64)]
        offsets.append(off)
        neighbors.append(nbr)
    del words
    return RawGraph(
        levels=levels[internal_of],
        offsets=offsets,
        neighbors=neighbors,
        entry_point=int(row_of[header.entry_point]),
        header=header,
    )


def cap_layers(raw: RawGraph, layers: int) -> Graph:
    """Clamp levels above ``layers-1`` into the top layer and drop their higher links."""
    n = raw.levels.shape[0]
    top = layers - 1
    if raw.header.max_level < top:
        raise IndexBuildError(
            f"hnswlib built only {raw.header.max_level + 1} layers for {n} vectors, {layers} requested"
        )
    empty_off = np.zeros(n + 1, dtype=np.int64)
    empty_nbr = np.zeros(0, dtype=np.int32)
    offsets = tuple(raw.offsets[layer] if layer < len(raw.offsets) else empty_off for layer in range(layers))
    neighbors = tuple(raw.neighbors[layer] if layer < len(raw.neighbors) else empty_nbr for layer in range(layers))
    return Graph(
        levels=np.minimum(raw.levels, top).astype(np.int8),
        offsets=offsets,
        neighbors=neighbors,
        entry_points=np.array([raw.entry_point], dtype=np.int32),
    )


# ----------------------------------------------------------------------------- reachability and repair


def gather_neighbours(offsets: np.ndarray, neighbors: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All out-neighbours of ``nodes`` on one layer: (source node of each edge, neighbour), CSR order."""
    start = offsets[nodes]
    count = offsets[nodes + 1] - start
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    base = np.repeat(start - (np.cumsum(count) - count), count)
    idx = base + np.arange(total, dtype=np.int64)
    return np.repeat(nodes, count), neighbors[idx].astype(np.int64)


def reach(offsets: np.ndarray, neighbors: np.ndarray, seen: np.ndarray, frontier: np.ndarray) -> None:
    """Breadth-first closure of ``seen`` along one layer's directed edges, from ``frontier`` (in place)."""
    chunk = 1 << 20
    while frontier.size:
        found = []
        for a in range(0, frontier.size, chunk):
            _, nb = gather_neighbours(offsets, neighbors, frontier[a : a + chunk])
            nb = np.unique(nb[~seen[nb]])
            seen[nb] = True
            found.append(nb)
        frontier = np.concatenate(found) if found else frontier[:0]


def layer_reachability(graph: Graph) -> list[np.ndarray]:
    """Per layer, the nodes a descent from the entry points can reach (bool masks over all nodes).

    Layer ``top`` is reached from the entry points along its own edges; layer ``l`` from everything
    reached on layer ``l+1`` (those nodes are on layer ``l`` too) along layer ``l``'s edges: exactly the
    nodes an HNSW search can ever visit.
    """
    n = graph.num_nodes
    masks: list[np.ndarray] = [np.zeros(0, bool)] * graph.num_layers
    seeds = np.unique(np.asarray(graph.entry_points, dtype=np.int64))
    for layer in range(graph.top_layer, -1, -1):
        seen = np.zeros(n, dtype=bool)
        seen[seeds] = True
        reach(graph.offsets[layer], graph.neighbors[layer], seen, seeds)
        masks[layer] = seen
        seeds = np.flatnonzero(seen)
    return masks


@dataclass(frozen=True)
class RepairReport:
    unreachable_before: list[int]  # per layer
    edges_added: list[int]  # per layer
    fallback_links: list[int]  # per layer: edges found by brute force (no reachable out-neighbour)


def repair_reachability(graph: Graph, vectors: np.ndarray) -> tuple[Graph, RepairReport]:
    """Add edges ``v -> u`` until every node of every layer is reachable from the entry points.

    For an unreachable node ``u`` the new edge comes from its nearest (L2) out-neighbour ``v`` that is
    already reachable: a reverse edge of one the HNSW heuristic chose, so it respects the graph's
    locality. If none of ``u``'s out-neighbours is reachable (a closed pocket), ``v`` is the nearest
    reachable node of the layer by brute force. Edges are appended after the heuristic's neighbours,
    so a node may exceed M (2M on layer 0) by its repair edges.
    """
    n = graph.num_nodes
    offsets, neighbors = list(graph.offsets), list(graph.neighbors)
    before, added, fallback = [0] * graph.num_layers, [0] * graph.num_layers, [0] * graph.num_layers
    seeds = np.unique(np.asarray(graph.entry_points, dtype=np.int64))
    levels = np.asarray(graph.levels)
    for layer in range(graph.top_layer, -1, -1):
        off, nbr = offsets[layer], neighbors[layer]
        on_layer = levels >= layer
        seen = np.zeros(n, dtype=bool)
        seen[seeds] = True
        reach(off, nbr, seen, seeds)
        before[layer] = int(np.count_nonzero(on_layer & ~seen))
        new_src: list[np.ndarray] = []
        new_dst: list[np.ndarray] = []
        while True:
            missing = np.flatnonzero(on_layer & ~seen)
            if missing.size == 0:
                break
            src, nb = gather_neighbours(off, nbr, missing)
            ok = seen[nb]
            src, nb = src[ok], nb[ok]
            if src.size:
                dist = np.einsum("ij,ij->i", *(2 * [vectors[src].astype(np.float32) - vectors[nb]]))
                order = np.lexsort((dist, src))
                first = np.ones(order.size, dtype=bool)
                first[1:] = src[order][1:] != src[order][:-1]
                u, v = src[order][first], nb[order][first]
            else:
                u = missing[:16]
                v = _nearest_in(vectors, u, np.flatnonzero(on_layer & seen))
                fallback[layer] += int(u.size)
            new_src.append(v)
            new_dst.append(u)
            seen[u] = True
            reach(off, nbr, seen, u)
        if new_src:
            src_all, dst_all = np.concatenate(new_src), np.concatenate(new_dst)
            added[layer] = int(src_all.size)
            offsets[layer], neighbors[layer] = append_edges(off, nbr, src_all, dst_all)
        seeds = np.flatnonzero(seen)
    repaired = Graph(
        levels=graph.levels, offsets=tuple(offsets), neighbors=tuple(neighbors), entry_points=graph.entry_points
    )
    return repaired, RepairReport(unreachable_before=before, edges_added=added, fallback_links=fallback)


def _nearest_in(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each query row, the candidate row nearest in L2 (brute force, chunked over candidates)."""
    q = np.asarray(vectors[queries], dtype=np.float32)
    best_d = np.full(q.shape[0], np.inf)
    best = np.zeros(q.shape[0], dtype=np.int64)
    for a in range(0, candidates.size, 1 << 16):
        cand = candidates[a : a + (1 << 16)]
        x = np.asarray(vectors[cand], dtype=np.float32)
        d = (x * x).sum(1)[None, :] - 2.0 * q @ x.T
        j = d.argmin(1)
        dj = d[np.arange(q.shape[0]), j]
        better = dj < best_d
        best_d[better], best[better] = dj[better], cand[j[better]]
    return best


def append_edges(
    offsets: np.ndarray, neighbors: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A new CSR with edges ``src[i] -> dst[i]`` appended after each source's existing neighbours."""
    n = offsets.shape[0] - 1
    old_count = np.diff(offsets)
    extra = np.bincount(src, minlength=n)
    new_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(old_count + extra, out=new_off[1:])
    new_nbr = np.empty(int(new_off[-1]), dtype=np.int32)
    chunk = 1 << 20
    for a in range(0, n, chunk):  # move old rows block by block: bounded temporaries at 10M nodes
        b = min(n, a + chunk)
        cnt = old_count[a:b]
        shift = np.repeat(new_off[a:b] - offsets[a:b], cnt)
        pos = np.arange(int(offsets[a]), int(offsets[b]), dtype=np.int64)
        new_nbr[pos + shift] = neighbors[offsets[a] : offsets[b]]
    order = np.argsort(src, kind="stable")
    s, d = src[order], dst[order]
    rank = np.arange(s.size) - np.searchsorted(s, s, side="left")  # index among same-source new edges
    new_nbr[new_off[s] + old_count[s] + rank] = d
    return new_off, new_nbr


def sort_neighbours_nearest_first(graph: Graph, vectors: np.ndarray, *, chunk_edges: int = 1 << 19) -> Graph:
    """Reorder every node's neighbour list by ascending L2 distance; same edges, new order.

    hnswlib writes a list by popping a max-heap, i.e. farthest first, and appends reverse links and
    our repair edges at the end, so its order carries no meaning. Nearest first lets the search cap
    the neighbours it expands per node (``SearchParams.max_degree``) and keep the closest ones.
    Works block by block over nodes, so temporaries stay near ``chunk_edges`` edges at 10M nodes.
    """
    new_neighbors = []
    for layer in range(graph.num_layers):
        off, nbr = graph.offsets[layer], graph.neighbors[layer]
        out = np.empty_like(nbr)
        n = off.shape[0] - 1
        a = 0
        while a < n:
            # the largest block of nodes starting at a whose edges fit in chunk_edges (at least one node)
            b = int(np.searchsorted(off, off[a] + chunk_edges, side="right")) - 1
            b = min(n, max(b, a + 1))
            lo, hi = int(off[a]), int(off[b])
            if hi > lo:
                src, dst = gather_neighbours(off, nbr, np.arange(a, b, dtype=np.int64))
                # two (chunk_edges, D) gathers, no third temporary: 256 MiB at 64 dims, whatever N is
                diff = np.asarray(vectors[src], dtype=np.float32)
                diff -= np.asarray(vectors[dst], dtype=np.float32)
                dist = np.einsum("ij,ij->i", diff, diff)
                order = np.lexsort((dist, src))  # by source node (keeps the CSR blocks), then distance
                out[lo:hi] = dst[order]
            a = b
        new_neighbors.append(out)
    return Graph(
        levels=graph.levels, offsets=graph.offsets, neighbors=tuple(new_neighbors), entry_points=graph.entry_points
    )
