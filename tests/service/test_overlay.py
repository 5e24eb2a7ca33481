"""Online HNSW insertion (service/overlay.py): the graph invariants over base + overlay, and search over both."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.bundle import load_bundle
from service.overlay import GraphOverlay, heuristic
from service.search import LiveGraph, VisitedSet, expand, search
from tests.fixtures.fake_bundle import make_fake_bundle


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    b = load_bundle(make_fake_bundle(tmp_path_factory.mktemp("ovl") / "b", num_entities=1500, dim=16))
    return b


def _new_vectors(base_vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = base_vectors[rng.integers(0, base_vectors.shape[0], n)] + 0.3 * rng.normal(size=(n, base_vectors.shape[1]))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _overlay(base, n: int, seed: int = 0, M: int = 8, native: bool = True) -> tuple[GraphOverlay, LiveGraph]:
    ov = GraphOverlay(base.graph, np.asarray(base.vectors), capacity=n + 10, M=M, ef_construction=64, seed=seed,
                      native=native)
    for v in _new_vectors(np.asarray(base.vectors), n, seed):
        ov.insert(v)
    import dataclasses

    return ov, LiveGraph(**{f.name: getattr(base.graph, f.name) for f in dataclasses.fields(base.graph)}, overlay=ov)


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "reference"])
def test_insertion_keeps_the_hnsw_invariants(base, native: bool) -> None:
    ov, g = _overlay(base, 300, native=native)
    E, N = ov.E, ov.num_nodes
    assert N == E + 300
    levels = np.concatenate([np.asarray(base.graph.levels), ov.levels[: ov.count]])
    assert levels.min() >= 0 and levels.max() <= 3  # the 4 layers
    # levels drawn from the base distribution: some new nodes above layer 0
    assert (ov.levels[: ov.count] >= 1).any()
    for layer in range(ov.layers):
        cap = ov.max_degree[layer]
        for r in range(N):
            lst = ov.neighbours(layer, r)
            if levels[r] < layer:
                assert lst.size == 0
                continue
            touched = ov._slot[layer][r] >= 0
            if touched:  # every list the overlay wrote respects its cap and has no self-loop or repeat
                assert lst.size <= cap, (layer, r, lst.size)
                assert r not in lst and np.unique(lst).size == lst.size
            if lst.size:
                assert (levels[lst] >= layer).all()  # neighbours live on this layer
        # every overlay node of this layer is linked both ways with at least one neighbour
        for r in range(E, N):
            if levels[r] >= layer:
                nb = ov.neighbours(layer, r)
                assert nb.size > 0
                assert any(r in ov.neighbours(layer, int(e)) for e in nb), (layer, r)
    # reachable from the entry points: BFS over each layer from the nodes reached on the layer above
    reached = np.unique(np.asarray(base.graph.entry_points, dtype=np.int64))
    for layer in range(ov.layers - 1, -1, -1):
        seen = np.zeros(N, bool)
        seen[reached] = True
        frontier = reached
        while frontier.size:
            nb = expand(g, layer, frontier)
            nb = np.unique(nb[~seen[nb]])
            seen[nb] = True
            frontier = nb
        on_layer = np.flatnonzero(levels >= layer)
        assert seen[on_layer].all(), f"layer {layer}: {int((~seen[on_layer]).sum())} unreachable"
        reached = np.flatnonzero(seen)


def test_back_edges_are_added_or_the_list_is_full(base) -> None:
    ov = GraphOverlay(base.graph, np.asarray(base.vectors), capacity=50, M=8, ef_construction=64, seed=3)
    pruned = 0
    for v in _new_vectors(np.asarray(base.vectors), 40, 3):
        before = {(layer, r): ov.neighbours(layer, r).size for layer in range(ov.layers) for r in range(ov.num_nodes)}
        row = ov.insert(v)
        for layer in range(ov.level_of(row) + 1):
            for e in ov.neighbours(layer, row).tolist():
                back = ov.neighbours(layer, e)
                # the edge back is added, unless the list was full and the heuristic pruned the union
                assert row in back or before[(layer, e)] == ov.max_degree[layer]
                pruned += row not in back
                assert back.size <= ov.max_degree[layer]
    assert pruned < 40 * 8  # most back edges survive


def test_heuristic_keeps_diverse_neighbours() -> None:
    # two tight clusters: the heuristic keeps the nearest of each, not two of the nearer cluster
    vec = np.array([[1.0, 0.0], [1.1, 0.0], [1.05, 0.02], [0.0, 2.0]], np.float32)
    d = (vec**2).sum(axis=1)
    assert heuristic(np.arange(4), d, vec, 2).tolist() == [0, 3]
    assert heuristic(np.arange(2), d[:2], vec[:2], 5).tolist() == [0, 1]


def test_search_walks_base_and_overlay_as_one_graph(base) -> None:
    ov, g = _overlay(base, 200, seed=5)
    vis = VisitedSet(ov.E + ov.capacity)
    found = 0
    for i in range(0, 200, 10):
        row = ov.E + i
        q = ov.vectors_of(np.array([row]))[0]

        def score(rows: np.ndarray, q: np.ndarray = q) -> np.ndarray:
            return -((ov.vectors_of(rows) - q) ** 2).sum(axis=1).astype(np.float32)

        out = search(g, score, k=5, ef=(16, 8, 16, 32), steps=(1, 1, 2, 8), top_n=(8, 8, 16, 32), visited=vis,
                     whole_top_layer_up_to=4096)
        found += int(out.rows[0] == row)
    assert found >= 19  # the nearest neighbour of a new node's own vector is that node


def test_frozen_layers_equal_the_live_lists(base) -> None:
    ov, _ = _overlay(base, 120, seed=7)
    for layer in range(ov.layers):
        off, nb = ov.frozen_layer(layer)
        assert off.shape == (ov.num_nodes + 1,) and off[-1] == nb.size
        for r in np.random.default_rng(0).choice(ov.num_nodes, 200, replace=False).tolist() + list(range(ov.E, ov.num_nodes)):
            np.testing.assert_array_equal(nb[off[r] : off[r + 1]], ov.neighbours(layer, r))


def test_overlay_full_is_refused(base) -> None:
    from service.overlay import OverlayFull

    ov = GraphOverlay(base.graph, np.asarray(base.vectors), capacity=1, M=8)
    ov.insert(np.asarray(base.vectors[0]))
    with pytest.raises(OverlayFull):
        ov.insert(np.asarray(base.vectors[1]))




def _lists(ov: GraphOverlay) -> list[list[int]]:
    return [ov.neighbours(layer, r).tolist() for layer in range(ov.layers) for r in range(ov.num_nodes)]


@pytest.mark.parametrize(("M", "efc", "seed"), [(4, 16, 11), (8, 64, 12)])
def test_compiled_insertion_gives_the_reference_graph(base, M: int, efc: int, seed: int) -> None:
    # The kernels implement the reference step for step (same distances to the bit, same heap order,
    # ties by row): the graphs must be identical, not merely similar. M=4 fills lists fast, so the
    # pruning path (a full list re-selected by the heuristic) is exercised too.
    vecs = _new_vectors(np.asarray(base.vectors), 150, seed)
    out = []
    for native in (True, False):
        ov = GraphOverlay(base.graph, np.asarray(base.vectors), capacity=200, M=M, ef_construction=efc, seed=seed,
                          native=native)
        ov.insert_many(vecs[:60])  # one batch, then one at a time: the same sequence of insertions
        for v in vecs[60:]:
            ov.insert(v)
        out.append(ov)
    nat, ref = out
    assert nat.count == ref.count == 150
    np.testing.assert_array_equal(nat.levels, ref.levels)
    np.testing.assert_array_equal(nat._slot, ref._slot)
    np.testing.assert_array_equal(nat._used, ref._used)
    for a, b, used in zip(nat._adj, ref._adj, nat._used.tolist(), strict=True):
        np.testing.assert_array_equal(a[:used], b[:used])
    assert nat.overrides == ref.overrides > 0
    assert _lists(nat) == _lists(ref)
    # base rows whose edited list lost a CSR edge: the heuristic pruned a full list (compared above too)
    pruned = sum(not set(base.graph.neighbours(0, r).tolist()) <= set(nat.neighbours(0, r).tolist())
                 for r in np.flatnonzero(nat._slot[0][: nat.E] >= 0).tolist())
    assert pruned > 0


def test_distances_are_the_same_in_numpy_and_compiled() -> None:
    from service.overlay import l2_rows
    from service.overlay_kernels import dist_rows

    rng = np.random.default_rng(0)
    for dim in (5, 16, 19, 64):
        v = rng.normal(size=(300, dim)).astype(np.float32)
        ro = v.view()
        ro.flags.writeable = False
        want = l2_rows(v[3], v)
        got = np.array([dist_rows(ro, ro, 300, 3, r) for r in range(300)])
        np.testing.assert_array_equal(got, want)  # to the last bit: ties decide edges the same way
        np.testing.assert_allclose(want, ((v - v[3]) ** 2).sum(axis=1), rtol=1e-5, atol=1e-5)


def test_batching_does_not_change_the_graph(base) -> None:
    # a worker that applies a change of 50 entities and one that applies 50 changes of one get one state
    vecs = _new_vectors(np.asarray(base.vectors), 120, 4)
    a = GraphOverlay(base.graph, np.asarray(base.vectors), capacity=130, M=8, ef_construction=32, seed=4)
    b = GraphOverlay(base.graph, np.asarray(base.vectors), capacity=130, M=8, ef_construction=32, seed=4)
    a.insert_many(vecs[:50])
    a.insert_many(vecs[50:])
    for v in vecs:
        b.insert(v)
    assert _lists(a) == _lists(b)
    np.testing.assert_array_equal(a._slot, b._slot)


@pytest.mark.parametrize("filter_beam", [False, True])
def test_compiled_search_walks_the_overlay_like_the_numpy_loop(base, filter_beam: bool) -> None:
    ov, g = _overlay(base, 250, seed=9)
    assert ov.overrides > 0 and (ov.levels[: ov.count] == ov.layers - 1).sum() >= 0
    rng = np.random.default_rng(1)
    total = ov.E + ov.capacity
    keep_mask = rng.random(total) < 0.7
    checked_overlay = 0
    for i in range(12):
        q = rng.normal(size=ov._vectors.shape[1]).astype(np.float32)

        def score(rows: np.ndarray, q: np.ndarray = q) -> np.ndarray:
            return (ov.vectors_of(rows) @ q).astype(np.float32)

        def keep(rows: np.ndarray) -> np.ndarray:
            return keep_mask[rows]

        kw = dict(k=20, ef=(8, 8, 16, 48), steps=(1, 2, 3, 8), top_n=(8, 8, 16, 48), keep=keep if i % 2 else None,
                  filter_beam=filter_beam, max_degree=(0, 0, 0, 12) if i % 3 == 0 else ())
        a = search(g, score, visited=VisitedSet(total), loop="compiled", **kw)
        b = search(g, score, visited=VisitedSet(total), loop="numpy", **kw)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert [s.seen for s in a.layers] == [s.seen for s in b.layers]
        checked_overlay += int((a.rows >= ov.E).sum())
    assert checked_overlay > 0  # overlay rows were among the answers


def test_a_grown_adjacency_reads_as_the_older_lists() -> None:
    # A search step may hold the adjacency array from before the writer grew it and then read a slot
    # published in the new one: the slot is beyond the array it holds, and reads as unset (CSR list).
    from service.search_kernels import expand_unseen

    offsets = np.array([0, 2, 3, 3], dtype=np.int64)  # rows 0..2 base; row 3 an overlay row
    neighbors = np.array([1, 2, 0], dtype=np.int32)
    adj = np.full((2, 4), -1, dtype=np.int32)
    adj[1, :2] = [2, 3]
    slot = np.full(4, -1, dtype=np.int32)
    slot[0] = 1  # row 0 overridden: [2, 3]
    slot[1] = 5  # beyond this adj: read as its CSR list [0]
    slot[3] = 7  # an overlay row whose slot is beyond: no list
    seen = np.zeros(4, dtype=np.uint32)
    out = expand_unseen(offsets, neighbors, np.array([0, 1, 3]), 0, seen, np.uint32(1), slot, adj)
    assert out.tolist() == [2, 3, 0]
    seen[:] = 0
    plain = expand_unseen(offsets, neighbors, np.array([0, 1]), 0, seen, np.uint32(1), np.empty(0, np.int32),
                          np.empty((0, 1), np.int32))
    assert plain.tolist() == [1, 2, 0]
