"""MatchEngine over the fake bundle: exactness, filters, modes, errors, scorer parity, threads (CPU)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from contracts.bundle import Bundle, load_bundle
from contracts.features import UserFeatures
from service.engine import MatchEngine, SearchError, SearchParams
from service.scoring.device import DeviceGatherScorer
from service.scoring.host import CPU, CUDA, HostGatherScorer, choose_provider
from tests.fixtures.fake_bundle import make_fake_bundle

E = 1200
GRAPH_ONLY = SearchParams(exhaustive_threshold=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_fake_bundle(tmp_path_factory.mktemp("e") / "b", num_entities=E, dim=16, seed=1))


@pytest.fixture(scope="module")
def engine(bundle: Bundle) -> MatchEngine:
    return MatchEngine(bundle, params=GRAPH_ONLY, providers=[CPU])


def users(n: int, seed: int = 0) -> list[UserFeatures]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = np.full(8, -1, dtype=np.int64)
        h = int(rng.integers(0, 9))
        if h:
            seq[-h:] = rng.integers(0, E, h)
        out.append(UserFeatures(cat=rng.integers(0, 3, 2), num=rng.normal(size=2).astype(np.float32), seq=seq))
    return out


def test_full_width_graph_search_equals_exhaustive(engine: MatchEngine) -> None:
    wide = SearchParams(ef=(E,) * 4, steps=(40,) * 4, top_n=(E,) * 4, exhaustive_threshold=0)
    for u in users(3):
        for domain in (0, 1):
            g = engine.match(u, domain, 30, params=wide)
            x = engine.match(u, domain, 30, mode="exhaustive")
            assert g.mode == "graph" and x.mode == "exhaustive"
            np.testing.assert_array_equal(g.rows, x.rows)
            np.testing.assert_allclose(g.scores, x.scores, rtol=1e-5, atol=1e-6)


def test_narrow_search_covers_exhaustive_top_k(engine: MatchEngine) -> None:
    narrow = SearchParams(ef=(8, 16, 32, 64), steps=(1, 1, 1, 3), top_n=(0, 0, 20, 20), exhaustive_threshold=0)
    covs, share = [], []
    for u in users(15, seed=3):
        g = engine.match(u, 0, 20, params=narrow)
        x = engine.match(u, 0, 20, mode="exhaustive")
        covs.append(len(set(g.rows.tolist()) & set(x.rows.tolist())) / 20)
        share.append(g.stats.pair_evaluations / E)
    assert np.mean(covs) >= 0.9, np.mean(covs)
    assert np.mean(share) < 0.6, np.mean(share)


def test_result_invariants_and_stats(engine: MatchEngine, bundle: Bundle) -> None:
    r = engine.match(users(1)[0], 1, 40)
    assert r.rows.dtype == np.int64 and r.scores.dtype == np.float32 and len(r.rows) == 40
    assert np.unique(r.rows).size == 40 and np.all(np.diff(r.scores) <= 0)
    assert np.all((np.asarray(bundle.domain_mask)[r.rows] & np.uint64(2)) != 0)  # eligible in domain 1
    st = r.stats
    assert st.steps > 0 and st.scorer_calls > 0 and st.eligible == int(np.count_nonzero(np.asarray(bundle.domain_mask) & np.uint64(2)))
    assert 0 < st.user_encode_ms and 0 < st.search_ms <= st.total_ms and [ls.layer for ls in st.layers] == [3, 2, 1, 0]
    assert 0 < r.stats.scorer_ms <= r.stats.total_ms
    assert r.stats.pair_evaluations <= E


def test_pair_evaluations_count_unique_rows(bundle: Bundle) -> None:
    eng = MatchEngine(bundle, params=GRAPH_ONLY, providers=[CPU])
    seen: list[np.ndarray] = []
    inner = eng.scorer.score_timed

    def spy(ctx, rows):
        seen.append(np.asarray(rows).copy())
        return inner(ctx, rows)

    eng.scorer.score_timed = spy  # type: ignore[method-assign]
    r = eng.match(users(1, seed=9)[0], 0, 25, params=SearchParams(ef=(32, 64, 128, 256), steps=(2, 2, 2, 5), top_n=(0, 0, 0, 25), exhaustive_threshold=0))
    allrows = np.concatenate(seen)
    assert allrows.size == np.unique(allrows).size == r.stats.pair_evaluations


def test_filters(engine: MatchEngine, bundle: Bundle) -> None:
    u = users(1, seed=5)[0]
    base = engine.match(u, 0, 20)
    excl = base.rows[:5]
    r = engine.match(u, 0, 20, exclude_rows=excl)
    assert not np.isin(r.rows, excl).any() and len(r.rows) == 20
    shops = engine.match(u, 0, 10, entity_types=[1])
    assert np.all(np.asarray(bundle.entity_type)[shops.rows] == 1)
    xs = engine.match(u, 0, 10, entity_types=[1], mode="exhaustive")
    assert np.all(np.asarray(bundle.entity_type)[xs.rows] == 1) and len(xs.rows) == 10


def test_mode_chosen_by_threshold(bundle: Bundle) -> None:
    u = users(1)[0]
    eng = MatchEngine(bundle, params=SearchParams(exhaustive_threshold=E), providers=[CPU])
    assert eng.match(u, 0, 5).mode == "exhaustive"
    eng = MatchEngine(bundle, params=SearchParams(exhaustive_threshold=E - 1), providers=[CPU])
    assert eng.match(u, 0, 5).mode == "graph"
    # a type filter shrinks the eligible catalogue below the threshold: exhaustive for that request
    shops = int((np.asarray(bundle.entity_type) == 1).sum())
    eng = MatchEngine(bundle, params=SearchParams(exhaustive_threshold=shops), providers=[CPU])
    assert eng.match(u, 0, 5, entity_types=[1]).mode == "exhaustive"


def test_bundle_without_graph_is_exhaustive(tmp_path: Path) -> None:
    b = load_bundle(make_fake_bundle(tmp_path / "b", num_entities=300, dim=8, with_graph=False))
    eng = MatchEngine(b, providers=[CPU])
    r = eng.match(UserFeatures.cold_start(b.schema), 0, 7)
    assert r.mode == "exhaustive" and len(r.rows) == 7 and r.stats.pair_evaluations == 300
    with pytest.raises(SearchError, match="no graph"):
        eng.match(UserFeatures.cold_start(b.schema), 0, 7, mode="graph")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": -3}, "k must be a positive integer"),
        ({"k": E + 1}, "exceeds the 1200 entities eligible"),
        ({"domain": 2}, "unknown domain index 2"),
        ({"domain": -1}, "unknown domain index"),
        ({"entity_types": [7]}, "entity_types must be"),
        ({"entity_types": []}, "entity_types must be"),
        ({"exclude_rows": np.array([E])}, "exclude_rows must be"),
        ({"mode": "fast"}, "mode must be one of"),
    ],
)
def test_bad_arguments(engine: MatchEngine, kwargs: dict, message: str) -> None:
    args = {"user": users(1)[0], "domain": 0, "k": 5} | kwargs
    with pytest.raises(SearchError, match=message):
        engine.match(**args)


def test_k_above_domain_catalogue(engine: MatchEngine, bundle: Bundle) -> None:
    in_d1 = int(((np.asarray(bundle.domain_mask) & np.uint64(2)) != 0).sum())
    with pytest.raises(SearchError, match=f"exceeds the {in_d1} entities eligible in domain 'domain_1'"):
        engine.match(users(1)[0], 1, in_d1 + 1)


def test_bad_user_features(engine: MatchEngine) -> None:
    bad = UserFeatures(cat=np.zeros(3, np.int64), num=np.zeros(2, np.float32), seq=np.full(8, -1))
    with pytest.raises(SearchError, match="user features must have shapes"):
        engine.match(bad, 0, 5)
    bad = UserFeatures(cat=np.zeros(2, np.int64), num=np.zeros(2, np.float32), seq=np.full(8, E))
    with pytest.raises(SearchError, match="sequence rows"):
        engine.match(bad, 0, 5)


def test_bad_params() -> None:
    with pytest.raises(SearchError, match="one value per layer"):
        SearchParams(ef=(1, 2), steps=(1,), top_n=(1, 1))
    with pytest.raises(SearchError, match="ef must be >= 1"):
        SearchParams(ef=(0, 1, 1, 1))


def test_deadline_gives_partial(engine: MatchEngine) -> None:
    r = engine.match(users(1)[0], 0, 10, deadline=time.monotonic() - 1.0)
    assert r.partial and r.mode == "graph" and len(r.rows) <= 10
    x = engine.match(users(1)[0], 0, 10, mode="exhaustive", deadline=time.monotonic() - 1.0)
    assert not x.partial  # one chunk always runs, and this catalogue fits in one


def test_deterministic_and_thread_safe(engine: MatchEngine) -> None:
    us = users(12, seed=11)
    sequential = [engine.match(u, i % 2, 15) for i, u in enumerate(us)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda iu: engine.match(iu[1], iu[0] % 2, 15), enumerate(us)))
    for a, b in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_scorer_batch_size_parity(bundle: Bundle) -> None:
    big = HostGatherScorer(bundle, max_batch=16384)
    small = HostGatherScorer(bundle, max_batch=7)
    u = users(1, seed=2)[0]
    rows = np.random.default_rng(0).permutation(E)[:500].astype(np.int64)
    a = big.score(big.encode(u.cat, u.num, u.seq, 1), rows)
    b = small.score(small.encode(u.cat, u.num, u.seq, 1), rows)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    single = np.concatenate([big.score(big.encode(u.cat, u.num, u.seq, 1), rows[i : i + 1]) for i in range(20)])
    np.testing.assert_allclose(a[:20], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fp16", [False, True])
def test_device_gather_scorer_matches_host_gather(bundle: Bundle, fp16: bool) -> None:
    host = HostGatherScorer(bundle)
    dev = DeviceGatherScorer(bundle, provider=CPU, fp16_tables=fp16)  # the GPU code path, on host memory
    u = users(1, seed=4)[0]
    rows = np.arange(0, E, 3, dtype=np.int64)
    a = host.score(host.encode(u.cat, u.num, u.seq, 0), rows)
    b = dev.score(dev.encode(u.cat, u.num, u.seq, 0), rows)
    np.testing.assert_allclose(a, b, rtol=1e-2 if fp16 else 1e-5, atol=1e-2 if fp16 else 1e-6)


def test_provider_fallback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA provider present: no fallback to observe")
    with caplog.at_level("WARNING", logger="unimatch.scorer"):
        assert choose_provider(None) == CPU
    assert "CUDA provider not available" in caplog.text
    assert choose_provider([CPU]) == CPU
    with pytest.raises(ValueError, match="unsupported onnxruntime providers"):
        choose_provider(["TensorrtExecutionProvider"])


def test_cold_start_warmup_and_info(engine: MatchEngine, bundle: Bundle) -> None:
    u = UserFeatures.cold_start(bundle.schema)
    assert u.seq.shape == (8,) and np.all(u.seq == -1) and u.num[1] == pytest.approx(0.5)
    assert len(engine.match(u, 0, 10).rows) == 10
    engine.warmup()
    info = engine.info()
    assert info["provider"] == CPU and info["graph"]["layers"] == 4 and info["intra_op_threads"] == 1
    assert info["graph"]["nodes_per_layer"][0] == E


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(), reason="needs CUDA")
def test_cuda_engine_matches_cpu(bundle: Bundle) -> None:
    cpu = MatchEngine(bundle, params=GRAPH_ONLY, providers=[CPU])
    gpu = MatchEngine(bundle, params=GRAPH_ONLY, providers=[CUDA, CPU])
    assert gpu.provider == CUDA
    for u in users(3):
        a, b = cpu.match(u, 0, 20, mode="exhaustive"), gpu.match(u, 0, 20, mode="exhaustive")
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3, atol=1e-4)


def test_batching_scorer_merges_concurrent_requests(bundle: Bundle) -> None:
    from service.scoring.batching import BatchingScorer

    host = HostGatherScorer(bundle)
    batcher = BatchingScorer(bundle, provider=CPU)  # the GPU batching code path, on host memory
    try:
        us = users(6, seed=8)
        rng = np.random.default_rng(1)
        work = [(u, i % 2, rng.permutation(E)[: 50 + 10 * i].astype(np.int64)) for i, u in enumerate(us)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            got = list(pool.map(lambda w: batcher.score(batcher.encode(w[0].cat, w[0].num, w[0].seq, w[1]), w[2]), work))
        for (u, d, rows), scores in zip(work, got, strict=True):
            want = host.score(host.encode(u.cat, u.num, u.seq, d), rows)
            np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
        assert batcher.merged_steps >= 6 and batcher.calls <= batcher.merged_steps
    finally:
        batcher.close()


def test_engine_with_request_batching_matches_plain_engine(engine: MatchEngine, bundle: Bundle) -> None:
    batched = MatchEngine(bundle, params=GRAPH_ONLY, providers=[CPU], batch_requests=True)
    try:
        assert batched.info()["scorer"] == "BatchingScorer"
        us = users(8, seed=12)
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda u: batched.match(u, 0, 15), us))
        for u, r in zip(us, got, strict=True):
            want = engine.match(u, 0, 15)
            np.testing.assert_array_equal(r.rows, want.rows)
    finally:
        batched.close()


def test_search_params_validate_max_degree() -> None:
    from service.engine import SearchError, SearchParams

    assert SearchParams(max_degree=(0, 0, 0, 16)).for_k(500).max_degree == (0, 0, 0, 16)
    with pytest.raises(SearchError, match="max_degree"):
        SearchParams(max_degree=(16,))
    with pytest.raises(SearchError, match="max_degree"):
        SearchParams(max_degree=(0, 0, 0, -1))


def test_exhaustive_mode_scores_in_chunks_with_the_same_answer(bundle: Bundle) -> None:
    from service.engine import EXHAUSTIVE_CHUNK_CPU

    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"])
    assert engine.exhaustive_chunk == min(EXHAUSTIVE_CHUNK_CPU, engine.scorer.max_batch)
    u = users(1, seed=3)[0]
    whole = engine.match(u, 0, 25, mode="exhaustive")
    engine.exhaustive_chunk = 7
    chunked = engine.match(u, 0, 25, mode="exhaustive")
    eligible = engine.eligible_count(0)
    assert whole.stats.scorer_calls == -(-eligible // min(EXHAUSTIVE_CHUNK_CPU, engine.scorer.max_batch))
    assert chunked.stats.scorer_calls == -(-eligible // 7) and chunked.stats.pair_evaluations == eligible
    np.testing.assert_array_equal(whole.rows, chunked.rows)
    np.testing.assert_allclose(whole.scores, chunked.scores, rtol=1e-5, atol=1e-6)
