"""On-disk format of the serving graph: per-layer CSR arrays that every service replica memory-maps.

The layout is docs/bundle-format.md (format version 1)::

    graph/levels.npy              (E,)   int8   HNSW level of each node (node id == entity row)
    graph/layer{l}_offsets.npy    (E+1,) int64  CSR offsets of layer l over all node ids
    graph/layer{l}_neighbors.npy  (nnz,) int32  neighbour node ids of layer l
    graph/entry_points.npy        (n,)   int32  entry point(s), all on the top layer

A node on level ``v`` belongs to layers 0..v (the HNSW paper's nesting, section 4); on layers above
its level its CSR row is empty. The service walks these arrays (paper section IV-B: beam search over
the 4-layer graph, the model scoring candidates), so this module imports nothing heavier than numpy:
the index builder writes the graph with ``write_graph_arrays``, the torch-free, hnswlib-free service
loads it with ``load_graph``, and both hold the same ``Graph``.

Arrays are opened with ``numpy.load(mmap_mode="r", allow_pickle=False)``: the pages live in the OS page
cache once, shared by every worker process on the host, and opening costs no read of the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from contracts.io import sha256_file
from contracts.manifest import BundleError, read_manifest

GRAPH_DIR = "graph"
LEVELS_FILE = "graph/levels.npy"
ENTRY_POINTS_FILE = "graph/entry_points.npy"
HEALTH_FILE = "graph_health.json"


def offsets_file(layer: int) -> str:
    return f"graph/layer{layer}_offsets.npy"


def neighbors_file(layer: int) -> str:
    return f"graph/layer{layer}_neighbors.npy"


def graph_files(layers: int) -> list[str]:
    """Bundle-relative paths of every array of a graph with ``layers`` layers, in writing order."""
    files = [LEVELS_FILE]
    for layer in range(layers):
        files += [offsets_file(layer), neighbors_file(layer)]
    return files + [ENTRY_POINTS_FILE]


@dataclass(frozen=True)
class Graph:
    """A layered HNSW graph as CSR arrays; ``offsets[l]``/``neighbors[l]`` hold layer ``l``.

    Neighbours of node ``u`` on layer ``l``: ``neighbors[l][offsets[l][u]:offsets[l][u + 1]]``, in the
    order the builder stored them: nearest first (L2) unless built with ``sort_neighbours=False``,
    in which case hnswlib's order (farthest first as its heap pops them, reverse links and repair edges appended).
    """

    levels: np.ndarray  # (E,) int8
    offsets: tuple[np.ndarray, ...]  # layers x (E+1,) int64
    neighbors: tuple[np.ndarray, ...]  # layers x (nnz_l,) int32
    entry_points: np.ndarray  # (n,) int32

    @property
    def num_layers(self) -> int:
        return len(self.offsets)

    @property
    def num_nodes(self) -> int:
        return int(self.levels.shape[0])

    @property
    def top_layer(self) -> int:
        return self.num_layers - 1

    def neighbours(self, layer: int, node: int) -> np.ndarray:
        off = self.offsets[layer]
        return self.neighbors[layer][off[node] : off[node + 1]]

    def degrees(self, layer: int) -> np.ndarray:
        return np.diff(self.offsets[layer])

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
        search's entry set needs it on every request (0.37 ms of an 11 ms query at 1M before it was cached)."""
        return self.layer_nodes(self.num_layers - 1)


def write_graph_arrays(graph: Graph, graph_dir: Path) -> dict[str, dict[str, object]]:
    """Write ``graph``'s arrays into ``graph_dir``; return sha256/bytes keyed by bundle-relative path.

    The caller makes the write atomic (``graph_dir`` is a staging directory renamed to ``BUNDLE/graph``)
    and records the returned dict in the bundle manifest.
    """
    validate_graph(graph)
    arrays: dict[str, np.ndarray] = {LEVELS_FILE: graph.levels, ENTRY_POINTS_FILE: graph.entry_points}
    for layer in range(graph.num_layers):
        arrays[offsets_file(layer)] = graph.offsets[layer]
        arrays[neighbors_file(layer)] = graph.neighbors[layer]
    files: dict[str, dict[str, object]] = {}
    for rel in graph_files(graph.num_layers):
        path = Path(graph_dir) / Path(rel).name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.ascontiguousarray(arrays[rel]), allow_pickle=False)
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def validate_graph(graph: Graph) -> None:
    """Structural checks that make every walk of the graph safe; O(E x layers + nnz), once per load.

    dtypes and shapes; per layer, offsets that start at 0, never decrease and end at nnz; neighbour ids
    in ``[0, E)``; levels in ``[0, layers)``, a node's row empty on every layer above its level and its
    neighbours on layer ``l`` all on level ``l`` or higher (the HNSW nesting); entry points on the top
    layer. A graph failing any of these would raise (or read out of bounds) inside a request: a reload
    that accepted out-of-range ids once failed every k >= 500 search.
    """
    n = graph.num_nodes
    if graph.levels.dtype != np.int8 or graph.levels.ndim != 1:
        raise BundleError(f"levels: expected (E,) int8, got {graph.levels.shape} {graph.levels.dtype}")
    if len(graph.neighbors) != graph.num_layers or graph.num_layers == 0:
        raise BundleError("graph: offsets and neighbors must have one array per layer")
    levels = np.asarray(graph.levels)
    if n and (int(levels.min()) < 0 or int(levels.max()) >= graph.num_layers):
        raise BundleError(
            f"{LEVELS_FILE}: levels must be in [0, {graph.num_layers}), got {int(levels.min())}..{int(levels.max())}"
        )
    for layer, (off, nbr) in enumerate(zip(graph.offsets, graph.neighbors, strict=True)):
        if off.dtype != np.int64 or off.shape != (n + 1,):
            raise BundleError(f"{offsets_file(layer)}: expected ({n + 1},) int64, got {off.shape} {off.dtype}")
        if nbr.dtype != np.int32 or nbr.ndim != 1:
            raise BundleError(f"{neighbors_file(layer)}: expected (nnz,) int32, got {nbr.shape} {nbr.dtype}")
        if int(off[0]) != 0 or int(off[-1]) != nbr.shape[0]:
            raise BundleError(
                f"{offsets_file(layer)}: offsets must start at 0 and end at nnz={nbr.shape[0]}, "
                f"got {int(off[0])}..{int(off[-1])}"
            )
        degrees = np.diff(np.asarray(off))
        if degrees.size and int(degrees.min()) < 0:
            first = int(np.argmax(degrees < 0))
            raise BundleError(f"{offsets_file(layer)}: offsets decrease at node {first} (must be monotone)")
        if nbr.shape[0] == 0:
            continue
        ids = np.asarray(nbr)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n:
            bad = int(np.argmax((ids < 0) | (ids >= n)))
            raise BundleError(
                f"{neighbors_file(layer)}: neighbour id {int(ids[bad])} at position {bad} outside [0, {n})"
            )
        if layer == 0:
            continue  # every node is on layer 0: nothing more to check there
        below = levels < layer
        if np.any(degrees[below] != 0):
            node = int(np.flatnonzero(below & (degrees != 0))[0])
            raise BundleError(
                f"{offsets_file(layer)}: node {node} has level {int(levels[node])} but neighbours on layer {layer}"
            )
        if np.any(below[ids]):
            bad = int(np.argmax(below[ids]))
            raise BundleError(
                f"{neighbors_file(layer)}: neighbour {int(ids[bad])} (level {int(levels[ids[bad]])}) "
                f"is not on layer {layer}"
            )
    ep = graph.entry_points
    if ep.dtype != np.int32 or ep.ndim != 1 or ep.shape[0] == 0:
        raise BundleError(f"entry_points: expected non-empty (n,) int32, got {ep.shape} {ep.dtype}")
    if int(ep.min()) < 0 or int(ep.max()) >= n:
        raise BundleError(f"entry_points: ids must be in [0, {n}), got {ep.tolist()[:8]}")
    if not np.all(graph.levels[ep] >= graph.top_layer):
        raise BundleError(f"entry_points: not all on the top layer {graph.top_layer}")


def load_graph(bundle_path: Path, *, manifest: dict | None = None, verify_checksums: bool = False) -> Graph:
    """Memory-map the graph of a bundle (no copy, no pickle); raise BundleError if it is not usable.

    Args:
        bundle_path: the bundle directory (contains ``manifest.json`` with a ``graph`` section).
        manifest: the bundle's manifest when the caller has read it already (read from disk otherwise).
        verify_checksums: also hash every graph file against the manifest (reads all bytes once).
    """
    bundle = Path(bundle_path)
    manifest_path = bundle / "manifest.json"
    if manifest is None:
        manifest = read_manifest(bundle, check_version=False)
    section = manifest.get("graph")
    if not isinstance(section, dict):
        raise BundleError(f"{manifest_path}: no 'graph' section; run `unimatch index build --bundle {bundle}`")
    layers = section.get("layers")
    if not isinstance(layers, int) or layers < 1:
        raise BundleError(f"{manifest_path}: graph.layers must be a positive integer, got {layers!r}")
    recorded = section.get("files", {})
    for rel in graph_files(layers):
        if rel not in recorded:
            raise BundleError(f"{manifest_path}: graph.files lacks {rel}")
        if verify_checksums:
            digest = sha256_file(bundle / rel)
            if digest != recorded[rel].get("sha256"):
                raise BundleError(f"{bundle / rel}: sha256 {digest} does not match the manifest")

    def mmap(rel: str) -> np.ndarray:
        path = bundle / rel
        try:
            # np.asarray: a plain ndarray view of the same map; indexing an np.memmap subclass costs ~10 us
            # per call in __array_finalize__, and the search indexes these arrays dozens of times a request.
            return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
        except FileNotFoundError:
            raise BundleError(f"{path}: missing graph file") from None
        except ValueError as exc:
            raise BundleError(f"{path}: not a plain .npy array ({exc})") from None

    graph = Graph(
        levels=mmap(LEVELS_FILE),
        offsets=tuple(mmap(offsets_file(layer)) for layer in range(layers)),
        neighbors=tuple(mmap(neighbors_file(layer)) for layer in range(layers)),
        entry_points=mmap(ENTRY_POINTS_FILE),
    )
    validate_graph(graph)
    num_entities = manifest.get("num_entities")
    if isinstance(num_entities, int) and num_entities != graph.num_nodes:
        raise BundleError(
            f"{bundle / LEVELS_FILE}: graph has {graph.num_nodes} nodes, manifest num_entities is {num_entities}"
        )
    return graph

