"""Index builder: exact layer count, HNSW validity, faithful extraction, bundle writing, bad input."""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pytest

from contracts.graph import Graph, graph_files, load_graph
from contracts.io import sha256_file
from contracts.manifest import BundleError
from index_builder.build import build_graph, build_index
from index_builder.config import IndexConfig, IndexConfigError
from index_builder.hnsw import (
    append_edges,
    build_hnswlib,
    layer_reachability,
    level_multiplier,
    read_hnswlib_file,
    repair_reachability,
    sort_neighbours_nearest_first,
)
from tests.index_builder.helpers import clustered_vectors, make_bundle

# Small graphs build in well under a second each on 2 cores.
FAST = IndexConfig(M=8, ef_construction=40, health_queries=20, health_ef=100)


def _python_reachable(graph: Graph) -> list[set[int]]:
    """Reference reachability by a plain BFS per layer, independent of the vectorised one."""
    seeds = {int(e) for e in graph.entry_points}
    out: list[set[int]] = [set()] * graph.num_layers
    for layer in range(graph.top_layer, -1, -1):
        seen, queue = set(seeds), deque(seeds)
        while queue:
            u = queue.popleft()
            for v in graph.neighbours(layer, u).tolist():
                if v not in seen:
                    seen.add(v)
                    queue.append(v)
        out[layer] = seen
        seeds = seen
    return out


def _assert_valid_hnsw(graph: Graph, layers: int) -> None:
    levels = np.asarray(graph.levels)
    assert graph.num_layers == layers
    assert levels.min() >= 0 and levels.max() == layers - 1  # exactly `layers` levels, top one non-empty
    assert np.all(levels[graph.entry_points] == layers - 1)
    for layer in range(layers):
        deg = graph.degrees(layer)
        assert not np.any(deg[levels < layer]), f"node off layer {layer} has links there"
        nbr = np.asarray(graph.neighbors[layer])
        assert np.all(levels[nbr] >= layer), f"layer {layer} links to a node not on it"
        assert np.all(nbr >= 0) and np.all(nbr < graph.num_nodes)


@pytest.mark.parametrize("n", [500, 5_000, 30_000])
def test_exactly_four_valid_layers(n: int) -> None:
    x = clustered_vectors(n, 16, seed=n)
    result = build_graph(x, FAST)
    _assert_valid_hnsw(result.graph, 4)
    rep = result.report
    assert rep["layers"] == 4 and len(rep["nodes_per_layer"]) == 4
    assert rep["nodes_per_layer"][0] == n and all(c > 0 for c in rep["nodes_per_layer"])
    assert rep["nodes_per_layer"] == sorted(rep["nodes_per_layer"], reverse=True)
    assert rep["nested"] and rep["entry_points_on_top_layer"] and rep["all_reachable"]
    # these seeded builds exercise both fixes: hnswlib drew levels above 3 (capped), and at 30k the
    # build left nodes unreachable that the repair linked (deterministic: one thread)
    assert rep["levels_before_capping"] > 4 and rep["nodes_capped_into_top_layer"] > 0
    if n == 30_000:
        assert sum(rep["repair"]["unreachable_before"]) > 0
        assert sum(rep["repair"]["edges_added"]) >= sum(rep["repair"]["unreachable_before"]) // 2
    masks = layer_reachability(result.graph)
    levels = np.asarray(result.graph.levels)
    for layer in range(4):
        assert np.all(masks[layer][levels >= layer]), f"unreachable node on layer {layer}"
    if n <= 5_000:
        ref = _python_reachable(result.graph)
        for layer in range(4):
            assert ref[layer] == set(np.flatnonzero(levels >= layer).tolist())


@pytest.mark.parametrize("layers", [2, 6])
def test_layer_count_is_a_parameter(layers: int) -> None:
    result = build_graph(
        clustered_vectors(3_000, 8), IndexConfig(layers=layers, M=8, ef_construction=40, health_queries=0)
    )
    _assert_valid_hnsw(result.graph, layers)
    assert result.report["layers"] == layers


def test_level_multiplier_matches_hnsw_default_for_large_catalogues() -> None:
    assert level_multiplier(10_000_000, 16, 4, 16) == pytest.approx(1 / math.log(16))
    # below N = M^4 the top layer is kept at ~top_layer_min nodes: P(level >= 3) * N == 16
    mult = level_multiplier(5_000, 16, 4, 16)
    assert 5_000 * math.exp(-3 / mult) == pytest.approx(16)


def test_file_parser_matches_hnswlib_state(tmp_path) -> None:
    """The memmap parser of save_index files agrees with hnswlib's own pickle state, link by link."""
    x = clustered_vectors(3_000, 8, seed=3)
    cfg = IndexConfig(M=8, ef_construction=40, threads=2)  # 2 threads: internal ids != insertion order
    index, path = build_hnswlib(x, cfg, tmp_path)
    raw = read_hnswlib_file(path, len(x))
    state = index.__getstate__()[0]
    n, rec, m0, mm = state["cur_element_count"], state["size_data_per_element"], state["max_M0"], state["max_M"]
    level0 = np.frombuffer(state["data_level0"], dtype=np.uint8)[: n * rec].reshape(n, rec)
    labels = level0[:, state["label_offset"] : state["label_offset"] + 8].copy().view(np.uint64)[:, 0].astype(int)
    levels = np.asarray(state["element_levels"])[:n]
    assert np.array_equal(raw.levels[labels], levels)
    assert raw.entry_point == labels[state["enterpoint_node"]]
    links = np.frombuffer(state["link_lists"], dtype=np.uint32)
    pos = 0
    for i in range(n):
        row = labels[i]
        words = level0[i, : 4 * (m0 + 1)].copy().view(np.uint32)
        expect0 = labels[words[1 : 1 + (words[0] & 0xFFFF)]]
        got0 = raw.neighbors[0][raw.offsets[0][row] : raw.offsets[0][row + 1]]
        assert np.array_equal(got0, expect0)
        for level in range(1, levels[i] + 1):
            block = links[pos + (level - 1) * (mm + 1) : pos + level * (mm + 1)]
            got = raw.neighbors[level][raw.offsets[level][row] : raw.offsets[level][row + 1]]
            assert np.array_equal(got, labels[block[1 : 1 + (block[0] & 0xFFFF)]])
        pos += levels[i] * (mm + 1)
    assert pos == links.size


def test_extracted_search_reproduces_library_results() -> None:
    x = clustered_vectors(5_000, 16, seed=7)
    cfg = IndexConfig(M=16, ef_construction=100, health_queries=50, health_k=100, health_ef=100)
    rep = build_graph(x, cfg).report
    # repair edges and capped levels may change a handful of results, nothing more
    assert rep["overlap_with_library"] >= 0.98
    assert abs(rep["l2_recall"] - rep["library_l2_recall"]) <= 0.02
    assert rep["l2_recall"] >= 0.95
    assert rep["l2_recall_at_100"] == rep["l2_recall"]


def test_same_seed_same_graph_different_seed_different_graph() -> None:
    x = clustered_vectors(2_000, 8, seed=1)
    a = build_graph(x, FAST).graph
    b = build_graph(x, FAST).graph
    c = build_graph(x, IndexConfig(M=8, ef_construction=40, health_queries=0, seed=5)).graph
    assert np.array_equal(a.levels, b.levels) and np.array_equal(a.neighbors[0], b.neighbors[0])
    assert not np.array_equal(a.levels, c.levels)


def _toy_graph(levels: list[int], edges: dict[int, list[list[int]]], entry: int) -> Graph:
    n, layers = len(levels), max(levels) + 1
    offsets, neighbors = [], []
    for layer in range(layers):
        rows = [edges.get(u, [[]] * layers)[layer] if levels[u] >= layer else [] for u in range(n)]
        offsets.append(np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64))
        neighbors.append(np.array([v for r in rows for v in r], dtype=np.int32))
    return Graph(np.array(levels, np.int8), tuple(offsets), tuple(neighbors), np.array([entry], np.int32))


def test_repair_links_unreachable_nodes_and_closed_pockets() -> None:
    # layer 1: {0, 1}; layer 0: 0 -> 1 -> 2; node 3 points to 2 (reachable: reverse edge 2 -> 3);
    # nodes 4 <-> 5 only point at each other (closed pocket: needs a brute-force link).
    levels = [1, 1, 0, 0, 0, 0]
    edges = {0: [[1], [1]], 1: [[2], []], 2: [[], []], 3: [[2], []], 4: [[5], []], 5: [[4], []]}
    g = _toy_graph(levels, edges, 0)
    x = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [10, 0], [11, 0]], np.float32)
    before = layer_reachability(g)
    assert not before[0][3] and not before[0][4]
    fixed, report = repair_reachability(g, x)
    assert report.unreachable_before == [3, 0]
    assert report.edges_added[0] >= 2 and report.fallback_links[0] >= 1
    assert 3 in fixed.neighbours(0, 2).tolist()  # reverse of 3 -> 2
    assert all(layer_reachability(fixed)[0])
    assert fixed.neighbours(0, 1).tolist()[0] == 2  # original links kept first


def test_append_edges_keeps_rows_and_appends() -> None:
    off = np.array([0, 2, 2, 3], np.int64)
    nbr = np.array([1, 2, 0], np.int32)
    new_off, new_nbr = append_edges(off, nbr, np.array([1, 0, 1]), np.array([0, 2, 2]))
    rows = [new_nbr[new_off[i] : new_off[i + 1]].tolist() for i in range(3)]
    assert rows == [[1, 2, 2], [0, 2], [0]]


def test_build_index_writes_bundle_and_manifest(tmp_path) -> None:
    bundle = make_bundle(tmp_path / "bundle", clustered_vectors(4_000, 16))
    original = json.loads((bundle / "manifest.json").read_text())
    report = build_index(bundle=bundle, cfg=FAST)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["files"] == original["files"] and manifest["vector_space"] == original["vector_space"]
    section = manifest["graph"]
    assert section["library"] == "hnswlib" and section["layers"] == 4 and section["M"] == 8
    assert section["ef_construction"] == 40 and section["seed"] == 0
    for rel in [*graph_files(4), "graph_health.json"]:
        assert section["files"][rel]["sha256"] == sha256_file(bundle / rel)
        assert section["files"][rel]["bytes"] == (bundle / rel).stat().st_size
    health = json.loads((bundle / "graph_health.json").read_text())
    assert health["layers"] == 4 and health["nodes_per_layer"] == report["nodes_per_layer"]
    assert isinstance(health["l2_recall_at_100"], float) and health["l2_recall_at_100"] > 0.9
    assert not any(p.name.startswith(".") or p.suffix == ".hnsw" for p in bundle.rglob("*"))  # no leftovers
    # readable by replicas running as another user: the bundle's own modes, not tempfile's 0700/0600
    assert (bundle / "graph").stat().st_mode & 0o777 == (bundle / "entities").stat().st_mode & 0o777
    assert (bundle / "manifest.json").stat().st_mode & 0o777 == (bundle / "entities/vectors.npy").stat().st_mode & 0o777
    assert (bundle / "graph_health.json").stat().st_mode & 0o777 == (bundle / "manifest.json").stat().st_mode & 0o777

    graph = load_graph(bundle, verify_checksums=True)
    assert graph.levels.dtype == np.int8 and graph.entry_points.dtype == np.int32
    assert all(o.dtype == np.int64 and o.shape == (4_001,) for o in graph.offsets)
    assert all(nb.dtype == np.int32 for nb in graph.neighbors)
    _assert_valid_hnsw(graph, 4)

    # rebuilding replaces the graph in place and keeps the manifest valid
    build_index(bundle=bundle, cfg=IndexConfig(M=8, ef_construction=40, health_queries=0, seed=3))
    assert json.loads((bundle / "manifest.json").read_text())["graph"]["seed"] == 3
    load_graph(bundle, verify_checksums=True)


def test_load_graph_memory_maps_without_copy(tmp_path) -> None:
    bundle = make_bundle(tmp_path / "b", clustered_vectors(1_000, 8))
    build_index(bundle=bundle, cfg=FAST)
    g1, g2 = load_graph(bundle), load_graph(bundle)
    # plain ndarray views of read-only memory maps (indexing the np.memmap subclass itself is slower)
    for arr in (g1.levels, g1.entry_points, *g1.offsets, *g1.neighbors):
        assert type(arr) is np.ndarray and isinstance(arr.base, np.memmap) and not arr.flags.writeable
        assert str(arr.base.filename).startswith(str((bundle / "graph").resolve()))
    # two loads map the same file pages instead of holding private copies
    import mmap

    assert isinstance(g1.neighbors[0].base.base, mmap.mmap) and isinstance(g2.neighbors[0].base.base, mmap.mmap)
    assert g1.neighbors[0].base.filename == g2.neighbors[0].base.filename


def test_load_graph_detects_tampering_and_missing_graph(tmp_path) -> None:
    bundle = make_bundle(tmp_path / "b", clustered_vectors(1_000, 8))
    with pytest.raises(BundleError, match="no 'graph' section"):
        load_graph(bundle)
    build_index(bundle=bundle, cfg=FAST)
    path = bundle / "graph/layer0_neighbors.npy"
    arr = np.load(path)
    arr[0] = (arr[0] + 1) % 1_000
    np.save(path, arr)
    load_graph(bundle)  # structure still fine
    with pytest.raises(BundleError, match="sha256"):
        load_graph(bundle, verify_checksums=True)


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.zeros((0, 8), np.float32), "no vectors"),
        (np.zeros(8, np.float32), "2-d"),
        (np.ones((10, 4), np.int64), "float32"),
    ],
)
def test_bad_vectors_rejected(tmp_path, vectors: np.ndarray, message: str) -> None:
    bundle = make_bundle(tmp_path / "b", vectors)
    with pytest.raises(BundleError, match=message):
        build_index(bundle=bundle, cfg=FAST)
    with pytest.raises(BundleError, match=message):
        build_graph(vectors, FAST)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors_rejected_naming_file_and_row(tmp_path, bad: float) -> None:
    x = clustered_vectors(300, 8)
    x[123, 5] = bad
    bundle = make_bundle(tmp_path / "b", x)
    with pytest.raises(BundleError, match=r"entities/vectors\.npy: row 123 contains NaN or inf"):
        build_index(bundle=bundle, cfg=FAST)


def test_mismatched_dimension_and_missing_vectors(tmp_path) -> None:
    bundle = make_bundle(tmp_path / "b", clustered_vectors(300, 8), dim=16)
    with pytest.raises(BundleError, match="dimension 8, manifest vector_space.dim is 16"):
        build_index(bundle=bundle, cfg=FAST)
    (bundle / "entities/vectors.npy").unlink()
    with pytest.raises(BundleError, match="vectors.npy missing"):
        build_index(bundle=bundle, cfg=FAST)
    with pytest.raises(BundleError, match="does not exist"):
        build_index(bundle=tmp_path / "nowhere", cfg=FAST)


def test_config_rejects_out_of_range() -> None:
    with pytest.raises(IndexConfigError, match="M must be"):
        IndexConfig(M=1)
    with pytest.raises(IndexConfigError, match="health_ef"):
        IndexConfig(health_ef=10, health_k=100)


def test_cli_builds_and_reports_bad_input_on_one_line(tmp_path, capsys) -> None:
    from unimatch.cli import main

    bundle = make_bundle(tmp_path / "b", clustered_vectors(2_000, 8))
    rc = main(
        ["index", "build", "--bundle", str(bundle), "--M", "8", "--ef-construction", "40", "--health-queries", "10"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "L2 recall@100" in out and "graph health" in out
    assert load_graph(bundle).num_layers == 4
    assert main(["index", "build", "--bundle", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unimatch: error:") and "\n" not in err


def test_progress_reports_insertion_to_completion_and_every_stage() -> None:
    calls: list[tuple[str, int, int]] = []
    build_graph(clustered_vectors(1_500, 8), FAST, progress=lambda s, d, t: calls.append((s, d, t)))
    inserts = [(d, t) for s, d, t in calls if s == "inserting vectors"]
    assert inserts[-1] == (1_500, 1_500)
    stages = [s for s, _, _ in calls]
    assert stages.index("repairing reachability") > stages.index("inserting vectors")
    assert any(s.startswith("health check") for s in stages)


def test_neighbour_lists_are_stored_nearest_first_with_the_same_edges() -> None:
    x = clustered_vectors(3_000, 8, seed=2)
    sorted_graph = build_graph(x, FAST).graph
    raw = build_graph(x, IndexConfig(M=8, ef_construction=40, health_queries=20, health_ef=100, sort_neighbours=False)).graph
    for layer in range(sorted_graph.num_layers):
        assert np.array_equal(sorted_graph.offsets[layer], raw.offsets[layer])
        for u in np.flatnonzero(np.asarray(sorted_graph.levels) >= layer)[:300]:
            got, orig = sorted_graph.neighbours(layer, int(u)), raw.neighbours(layer, int(u))
            assert sorted(got.tolist()) == sorted(orig.tolist())  # a permutation of the same edges
            d = ((x[got] - x[u]) ** 2).sum(1)
            assert np.all(np.diff(d) >= -1e-5), (layer, int(u))


def test_sort_neighbours_small_chunks_match_one_chunk() -> None:
    x = clustered_vectors(1_500, 8, seed=3)
    g = build_graph(x, IndexConfig(M=8, ef_construction=40, health_queries=0, sort_neighbours=False)).graph
    one = sort_neighbours_nearest_first(g, x)
    many = sort_neighbours_nearest_first(g, x, chunk_edges=7)  # blocks of a node or two
    for layer in range(g.num_layers):
        assert np.array_equal(one.neighbors[layer], many.neighbors[layer])
