"""The pure beam search (service.search): exactness at full width, recall vs brute force, invariants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.graph import Graph
from service.search import VisitedSet, best_first, entry, expand, merge, search
from tests.fixtures.fake_bundle import make_fake_bundle

E = 1500


@pytest.fixture(scope="module")
def graph_and_vectors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Graph, np.ndarray]:
    b = load_bundle(make_fake_bundle(tmp_path_factory.mktemp("s") / "b", num_entities=E, dim=16, seed=3))
    assert b.graph is not None and b.vectors is not None
    return b.graph, np.asarray(b.vectors)


class RecordingScore:
    """A model-free scorer (inner product with a query vector) that records every row it scores."""

    def __init__(self, vectors: np.ndarray, query: np.ndarray) -> None:
        self.vectors, self.query = vectors, query
        self.calls: list[np.ndarray] = []

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.copy())
        return (self.vectors[rows] @ self.query).astype(np.float32)

    @property
    def scored(self) -> np.ndarray:
        return np.concatenate(self.calls) if self.calls else np.empty(0, np.int64)


class TableScore(RecordingScore):
    """RecordingScore whose scores are looked up in a table computed once: independent of the batch."""

    def __init__(self, vectors: np.ndarray, query: np.ndarray) -> None:
        super().__init__(vectors, query)
        self.table = (vectors @ query).astype(np.float32)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.copy())
        return self.table[rows]


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = (vectors @ query).astype(np.float32)
    return best_first(np.arange(len(s), dtype=np.int64), s, k)


def run(graph: Graph, score, k: int, *, ef=(16, 32, 64, 128), steps=(1, 1, 1, 3), top_n=(0, 0, 50, 50), **kw):
    return search(graph, score, k=k, ef=ef, steps=steps, top_n=top_n, visited=VisitedSet(graph.num_nodes), **kw)


def test_full_width_search_is_exact(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    q = np.random.default_rng(0).normal(size=vec.shape[1]).astype(np.float32)
    out = run(graph, RecordingScore(vec, q), 40, ef=(E,) * 4, steps=(50,) * 4, top_n=(E,) * 4)
    rows, scores = brute_force(vec, q, 40)
    np.testing.assert_array_equal(out.rows, rows)
    np.testing.assert_allclose(out.scores, scores, rtol=1e-6)
    assert not out.partial


def test_recall_against_brute_force_at_default_width(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    rng = np.random.default_rng(1)
    covs, scored = [], []
    for _ in range(20):
        q = rng.normal(size=vec.shape[1]).astype(np.float32)
        s = RecordingScore(vec, q)
        out = run(graph, s, 20)
        covs.append(len(set(out.rows.tolist()) & set(brute_force(vec, q, 20)[0].tolist())) / 20)
        scored.append(s.scored.size)
    assert np.mean(covs) >= 0.9, np.mean(covs)
    assert np.mean(scored) < 0.6 * E  # and it did not simply score everything


def test_never_rescores_a_node(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    s = RecordingScore(vec, np.ones(vec.shape[1], np.float32))
    out = run(graph, s, 30, ef=(64, 128, 256, 512), steps=(3, 3, 3, 6))
    assert s.scored.size == np.unique(s.scored).size
    assert out.steps > 4
    # a second request on the same VisitedSet starts clean
    vis = VisitedSet(graph.num_nodes)
    s1, s2 = RecordingScore(vec, np.ones(16, np.float32)), RecordingScore(vec, np.ones(16, np.float32))
    a = search(graph, s1, k=10, ef=(8, 8, 16, 32), steps=(1, 1, 1, 2), top_n=(0, 0, 0, 10), visited=vis)
    b = search(graph, s2, k=10, ef=(8, 8, 16, 32), steps=(1, 1, 1, 2), top_n=(0, 0, 0, 10), visited=vis)
    assert s1.scored.size == s2.scored.size
    np.testing.assert_array_equal(a.rows, b.rows)


def test_deterministic(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    q = np.random.default_rng(7).normal(size=16).astype(np.float32)
    a, b = run(graph, RecordingScore(vec, q), 25), run(graph, RecordingScore(vec, q), 25)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_ordering_and_merge_invariants(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    q = np.random.default_rng(2).normal(size=16).astype(np.float32)
    s = RecordingScore(vec, q)
    out = run(graph, s, 50, top_n=(5, 5, 20, 50))
    assert len(out.rows) == 50 and np.unique(out.rows).size == 50
    assert np.all(np.diff(out.scores) <= 0)  # best first
    # every returned row was scored, and nothing scored but not returned beats the k-th result
    scored = np.unique(s.scored)
    assert np.isin(out.rows, scored).all()
    all_scores = (vec[scored] @ q).astype(np.float32)
    assert np.sum(all_scores > out.scores[-1]) <= 50


def test_keep_filters_results_not_navigation(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    q = np.random.default_rng(4).normal(size=16).astype(np.float32)
    even = run(graph, RecordingScore(vec, q), 20, keep=lambda r: r % 2 == 0)
    assert np.all(even.rows % 2 == 0) and len(even.rows) == 20


def test_deadline_returns_partial(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    ticks = iter(range(10_000))
    out = run(graph, RecordingScore(vec, np.ones(16, np.float32)), 10, deadline=2.5, clock=lambda: float(next(ticks)))
    assert out.partial and len(out.layers) < graph.num_layers
    assert np.all(np.diff(out.scores) <= 0)


def test_best_first_ties_break_by_row() -> None:
    rows = np.array([9, 3, 7, 1, 5], dtype=np.int64)
    scores = np.array([1.0, 2.0, 2.0, 0.5, 2.0], dtype=np.float32)
    r, s = best_first(rows, scores, 2)
    np.testing.assert_array_equal(r, [3, 5])
    r, s = best_first(rows, scores, 10)
    np.testing.assert_array_equal(r, [3, 5, 7, 9, 1])


def test_merge_deduplicates_across_layers() -> None:
    a = (np.array([4, 2]), np.array([0.9, 0.5], np.float32))
    b = (np.array([2, 8, 1]), np.array([0.5, 0.7, 0.1], np.float32))
    rows, scores = merge([a, b], 3)
    np.testing.assert_array_equal(rows, [4, 8, 2])
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.5])


def test_expand_matches_a_python_loop(graph_and_vectors) -> None:
    graph, _ = graph_and_vectors
    frontier = np.array([5, 17, 5, 1000], dtype=np.int64)
    off, nb = graph.offsets[0], graph.neighbors[0]
    expected = np.concatenate([nb[off[i] : off[i + 1]] for i in frontier])
    np.testing.assert_array_equal(expand(graph, 0, frontier), expected)
    assert expand(graph, 3, np.array([0], np.int64)).size == graph.offsets[3][1] - graph.offsets[3][0]


def test_visited_unseen_deduplicates_in_first_occurrence_order() -> None:
    v = VisitedSet(20)
    v.new_request()
    np.testing.assert_array_equal(v.unseen(np.array([5, 3, 5, 9, 3])), [5, 3, 9])
    np.testing.assert_array_equal(v.unseen(np.array([9, 1, 5])), [1])
    v.new_layer()
    np.testing.assert_array_equal(v.unseen(np.array([9, 1])), [9, 1])


def test_entry_scores_small_top_layer_whole(graph_and_vectors) -> None:
    graph, _ = graph_and_vectors
    top = graph.layer_nodes(3)
    np.testing.assert_array_equal(entry(graph, whole_top_layer_up_to=10_000), top)
    np.testing.assert_array_equal(entry(graph, whole_top_layer_up_to=0), np.unique(graph.entry_points))


def test_rejects_wrong_number_of_layers(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    with pytest.raises(ValueError, match="one value per layer"):
        search(graph, RecordingScore(vec, vec[0]), k=5, ef=(10,), steps=(1,), top_n=(5,), visited=VisitedSet(E))


def test_graph_dataclass_roundtrip(tmp_path: Path) -> None:
    b = load_bundle(make_fake_bundle(tmp_path / "b", num_entities=50, dim=4))
    assert b.graph is not None and b.graph.num_nodes == 50 and b.graph.num_layers == 4


def test_expand_max_degree_keeps_the_first_neighbours(graph_and_vectors) -> None:
    graph, _ = graph_and_vectors
    frontier = np.array([5, 17, 1000], dtype=np.int64)
    off, nb = graph.offsets[0], graph.neighbors[0]
    expected = np.concatenate([nb[off[i] : min(off[i + 1], off[i] + 3)] for i in frontier])
    np.testing.assert_array_equal(expand(graph, 0, frontier, max_degree=3), expected)
    widest = int(np.diff(np.asarray(off)).max())
    np.testing.assert_array_equal(expand(graph, 0, frontier, max_degree=widest), expand(graph, 0, frontier))


def test_max_degree_cuts_pairs_and_a_wide_cap_changes_nothing(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    q = np.random.default_rng(4).normal(size=vec.shape[1]).astype(np.float32)
    full, wide, capped = RecordingScore(vec, q), RecordingScore(vec, q), RecordingScore(vec, q)
    a = run(graph, full, 20)
    b = run(graph, wide, 20, max_degree=(0, 0, 0, 10_000))
    c = run(graph, capped, 20, max_degree=(0, 0, 0, 4))
    assert c.rows.size == 20
    np.testing.assert_array_equal(a.rows, b.rows)
    assert full.scored.size == wide.scored.size
    assert capped.scored.size < full.scored.size
    with pytest.raises(ValueError, match="max_degree"):
        run(graph, RecordingScore(vec, q), 20, max_degree=(4,))


def test_whole_top_layer_entry_is_independent_of_the_top_beam(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    q = np.random.default_rng(5).normal(size=vec.shape[1]).astype(np.float32)
    top = graph.layer_nodes(3)
    assert top.size > 2
    s = RecordingScore(vec, q)
    run(graph, s, 10, ef=(2, 8, 16, 32), whole_top_layer_up_to=top.size)
    np.testing.assert_array_equal(np.sort(s.calls[0]), top)  # first call: the whole top layer
    s1 = RecordingScore(vec, q)
    run(graph, s1, 10, ef=(2, 8, 16, 32), whole_top_layer_up_to=top.size - 1)
    np.testing.assert_array_equal(np.sort(s1.calls[0]), np.unique(graph.entry_points))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"keep": lambda r: r % 3 != 0, "filter_beam": True},
        {"keep": lambda r: r % 2 == 0},
        {"seeds": np.array([7, 70, 700, 7], dtype=np.int64), "max_degree": (0, 0, 0, 5)},
        {"whole_top_layer_up_to": 0, "ef": (4, 8, 16, 40), "steps": (2, 2, 3, 12), "top_n": (3, 3, 10, 40)},
    ],
)
def test_compiled_loop_matches_the_numpy_reference(graph_and_vectors, kw) -> None:
    graph, vec = graph_and_vectors
    rng = np.random.default_rng(11)
    for _ in range(8):
        q = rng.normal(size=vec.shape[1]).astype(np.float32)
        # One score per row, whatever batch it is asked in (a BLAS product's last bit depends on the
        # batch's length and alignment, and the two loops batch the same rows in another order).
        a_score, b_score = TableScore(vec, q), TableScore(vec, q)
        a = run(graph, a_score, 30, loop="numpy", **kw)
        b = run(graph, b_score, 30, loop="compiled", **kw)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert [s.steps for s in a.layers] == [s.steps for s in b.layers]
        assert [s.seen for s in a.layers] == [s.seen for s in b.layers]
        np.testing.assert_array_equal(np.sort(a_score.scored), np.sort(b_score.scored))  # same pairs, once each


def test_compiled_beam_breaks_ties_by_row(graph_and_vectors) -> None:
    """Every score equal: the beam's ef-th place is a tie, the smaller rows win, the answer is the k smallest
    rows seen (deterministic, whatever order the rows were produced in)."""
    graph, vec = graph_and_vectors

    def flat(rows: np.ndarray) -> np.ndarray:
        return np.zeros(rows.size, dtype=np.float32)

    a = run(graph, flat, 10)
    b = run(graph, flat, 10)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.rows, np.sort(a.rows))


def test_unknown_loop_is_refused(graph_and_vectors) -> None:
    graph, vec = graph_and_vectors
    with pytest.raises(ValueError, match="loop"):
        run(graph, RecordingScore(vec, vec[0]), 5, loop="rust")


def test_compiled_best_first_matches_best_first() -> None:
    from service.search_kernels import best_first_kernel

    rng = np.random.default_rng(5)
    for n in (1, 3, 10, 50, 200):
        rows = rng.permutation(400)[:150].astype(np.int64)
        scores = rng.integers(0, 12, rows.size).astype(np.float32)  # many ties, at the cut too
        want = best_first(rows, scores, n)
        got = best_first_kernel(rows, scores, n)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_compiled_merge_matches_merge() -> None:
    from service.search_kernels import merge_kernel

    rng = np.random.default_rng(6)
    table = rng.integers(0, 20, 300).astype(np.float32)  # one score per row, many ties
    layers = [rng.choice(300, size=n, replace=False).astype(np.int64) for n in (5, 12, 40, 90)]
    per_layer = [best_first(r, table[r], r.size) for r in layers]
    for k in (1, 10, 60, 500):
        want = merge(per_layer, k)
        got = merge_kernel(np.concatenate([r for r, _ in per_layer]), np.concatenate([s for _, s in per_layer]), k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
