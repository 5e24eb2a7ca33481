"""Search calibration (service.calibrate / contracts.calibration): measured points, fallback, storage, use."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.calibration import CalibrateConfig, CalibratedPoint, Calibration, graph_fingerprint
from contracts.manifest import BundleError
from service import calibrate as cal_mod
from service.bench.search_bench import held_out_queries
from service.calibrate import PointResult, calibrate, calibrate_bundle, calibrate_domain, write_calibration
from service.engine import EngineRequest, MatchEngine, SearchParams
from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset

FAST = dict(upper_scales=(1.0,), bottom_steps=(10,), seed_history=(False,))
NO_RETIME = dict(paired_timing_above=2.0)  # fake engines cannot be timed


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Calibration]:
    root = tmp_path_factory.mktemp("cal")
    bundle = make_fake_bundle(root / "bundle", num_entities=3000, seed=3)
    data = make_fake_dataset(root / "data", bundle, num_users=150, seed=3)
    cfg = CalibrateConfig(target=0.99, queries=80, ks=(10, 50), **FAST)
    cal = calibrate_bundle(bundle, data, cfg, log=lambda m: None)
    return bundle, data, cal


def _coverage(engine: MatchEngine, bundle_path: Path, data: Path, k: int, split: str) -> float:
    q = held_out_queries(data, engine.bundle, 200, 1, split=split)
    cov = []
    for u, d in zip(q.features, q.domains, strict=True):
        got = engine.match(u, int(d), k).rows
        exact = engine.match(u, int(d), k, mode="exhaustive").rows
        cov.append(np.intersect1d(got, exact).size / k)
    return float(np.mean(cov))


def test_calibration_meets_the_target_on_its_queries_and_is_stored(calibrated) -> None:
    bundle_path, _, cal = calibrated
    assert set(cal.domains) == {"domain_0", "domain_1"}
    for points in cal.domains.values():
        assert [p.k for p in points] == [10, 50]
        for p in points:
            assert p.coverage >= 0.99 or p.mode == "exhaustive"
            assert p.queries > 0 and p.exhaustive_pairs > 0
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    meta = manifest["calibration"]
    assert meta["file"] == "calibration.json" and len(meta["sha256"]) == 64
    assert meta["graph"] == graph_fingerprint(manifest)
    loaded = load_bundle(bundle_path)
    assert loaded.calibration is not None and loaded.calibration.domains == cal.domains


def test_engine_uses_the_calibration_and_holds_the_target_on_unseen_users(calibrated) -> None:
    bundle_path, data, cal = calibrated
    bundle = load_bundle(bundle_path)
    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"])
    assert engine.calibration is not None
    for d, name in enumerate(bundle.schema.domains):
        point = cal.domains[name][-1]
        mode, params = engine.calibrated(d, 50)
        assert mode == point.mode
        if mode == "graph":
            assert params.ef == point.ef and params.steps == point.steps
    # Test-split users were not used to calibrate: the target still holds within sampling noise.
    assert _coverage(engine, bundle_path, data, 50, "test") >= 0.97
    info = engine.info()
    assert info["calibration"]["target"] == 0.99 and "calibrated" in info["calibration_note"]


def test_explicit_search_params_override_the_calibration(calibrated) -> None:
    bundle = load_bundle(calibrated[0])
    engine = MatchEngine(bundle, params=SearchParams(), providers=["CPUExecutionProvider"])
    assert engine.calibration is None
    assert "overridden" in engine.info()["calibration_note"]


def test_k_above_every_bucket_scales_the_largest_buckets_beam() -> None:
    pt = CalibratedPoint(k=100, mode="graph", coverage=1.0, coverage_ci95=0.0, pairs=500, latency_ms_p50=1,
                         latency_ms_p99=1, exhaustive_pairs=3000, exhaustive_ms_p50=5, queries=10, reason="",
                         ef=(32, 8, 16, 300), steps=(1, 1, 2, 10), top_n=(8, 8, 16, 100))
    cal = Calibration(target=0.99, graph="x", domains={"a": (replace(pt, k=10, ef=(32, 8, 16, 20)), pt)})
    assert cal.lookup("a", 5)[1] == 20
    assert cal.lookup("a", 100)[1] == 300
    assert cal.lookup("a", 200)[1] == 600  # 3 x k, as measured at k = 100
    assert cal.lookup("b", 10) is None


def test_checksum_and_stale_graph(calibrated, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(calibrated[0], copy)
    text = (copy / "calibration.json").read_text()
    (copy / "calibration.json").write_text(text.replace('"target": 0.99', '"target": 0.5'))
    with pytest.raises(BundleError, match="calibration.json checksum mismatch"):
        load_bundle(copy)
    # A calibration measured on another graph is ignored, and the bundle says why.
    cal = replace(calibrated[2], graph="0000000000000000")
    write_calibration(copy, cal)
    b = load_bundle(copy)
    assert b.calibration is None and "another graph" in b.calibration_note


def test_index_rebuild_drops_the_calibration(calibrated, tmp_path: Path) -> None:
    from index_builder.build import build_index
    from index_builder.config import IndexConfig

    copy = tmp_path / "b"
    shutil.copytree(calibrated[0], copy)
    build_index(bundle=copy, cfg=IndexConfig(health_queries=10))
    assert "calibration" not in json.loads((copy / "manifest.json").read_text())
    assert load_bundle(copy).calibration is None


# ---- the decision, on measured points we control ------------------------------------------------------------
# The ladder from k up (before the sixth session): the decision tests below walk it; the rungs under k
# have their own test.
LADDER_FROM_K = tuple(a for a in cal_mod.EF_LADDER if a >= 1.0)


def _fake_points(monkeypatch: pytest.MonkeyPatch, table: dict[int, tuple[float, float, float]],
                 ladder: tuple[float, ...] = LADDER_FROM_K) -> list[int]:
    """evaluate_point answers from ``table``: bottom ef -> (coverage, pairs, p50 ms); records what was asked."""
    asked: list[int] = []
    monkeypatch.setattr(cal_mod, "EF_LADDER", ladder)

    def fake(engine, q, idx, k, ref, params: SearchParams) -> PointResult:
        ef = params.for_k(k).ef[-1]
        asked.append(ef)
        cov, pairs, ms = table.get(ef, (1.0, 1e9, 1e9))
        return PointResult(params.for_k(k), cov, 0.001, pairs, ms, ms)

    monkeypatch.setattr(cal_mod, "evaluate_point", fake)
    return asked


class _Engine:
    params = SearchParams()


def test_cheapest_point_meeting_the_target_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    k = 10
    # ladder rungs at k = 10: 10, 15, 20, 30, 40, 60, 80, ...
    asked = _fake_points(monkeypatch, {10: (0.90, 100, 1.0), 15: (0.992, 140, 1.2), 20: (0.995, 180, 1.3),
                                       30: (0.999, 260, 1.5)})
    cfg = CalibrateConfig(target=0.99, **FAST)
    pt = calibrate_domain(_Engine(), None, np.arange(5), [], k, ex_pairs=2000, ex_p50=10.0, cfg=cfg)
    assert pt.mode == "graph" and pt.ef[-1] == 15 and pt.coverage == 0.992 and pt.pairs == 140
    assert asked == [10, 20, 15]  # gallop to the first rung that meets it, then one back


def test_a_beam_narrower_than_k_is_chosen_where_it_meets_the_target_and_served_as_measured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    k = 10
    # full ladder at k = 10: 3, 4, 5, 6, 8, 10, 15, ...; galloped 3, 5, 8, ... then the rung below the hit
    asked = _fake_points(monkeypatch, {3: (0.95, 40, 1.0), 4: (0.985, 50, 1.0), 5: (0.993, 60, 1.0),
                                       10: (1.0, 100, 1.5)}, ladder=cal_mod.EF_LADDER)
    pt = calibrate_domain(_Engine(), None, np.arange(5), [], k, ex_pairs=2000, ex_p50=10.0,
                          cfg=CalibrateConfig(target=0.99, **FAST))
    assert asked == [3, 5, 4] and pt.mode == "graph" and pt.ef[-1] == 5 and pt.pairs == 60
    p = pt.params(SearchParams())
    assert p.narrow and p.for_k(10).ef[-1] == 5 and p.for_k(10).top_n[-1] == 10  # not raised to k: as measured
    assert SearchParams(ef=(32, 8, 16, 5)).for_k(10).ef[-1] == 10  # an uncalibrated point still is


def test_a_narrow_beam_that_sees_fewer_than_k_rows_searches_again_as_wide_as_k(calibrated) -> None:
    from contracts.features import UserFeatures

    bundle = load_bundle(calibrated[0])
    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"])
    user = UserFeatures.cold_start(bundle.schema)
    k = min(300, engine.eligible_count(0))
    narrow = SearchParams(ef=(4, 2, 2, 1), steps=(1, 1, 1, 10), top_n=(8, 8, 8, k), bottom_ef_floor=False)
    wide = replace(narrow, bottom_ef_floor=True)
    got, floor = engine.match(user, 0, k, params=narrow, mode="graph"), engine.match(user, 0, k, params=wide, mode="graph")
    assert got.rows.size == floor.rows.size == k  # a one-wide beam alone sees a few dozen rows
    np.testing.assert_array_equal(got.rows, floor.rows)
    assert got.stats.pair_evaluations > floor.stats.pair_evaluations  # the narrow search ran first, then the wide
    assert got.stats.widened and not floor.stats.widened
    many = engine.match_many([EngineRequest(user, 0, k, params=narrow, mode="graph")] * 2)
    np.testing.assert_array_equal(many[0].rows, floor.rows)
    assert many[0].stats.widened and many[1].stats.widened


def test_a_narrow_rung_that_had_to_widen_does_not_count_as_meeting_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    table = {3: (1.0, 500, 0.3), 5: (1.0, 520, 0.1), 8: (0.95, 90, 0.0), 15: (0.995, 150, 0.0), 10: (0.992, 100, 0.0)}

    def fake(engine, q, idx, k, ref, params: SearchParams) -> PointResult:
        ef = params.for_k(k).ef[-1]
        asked.append(ef)
        cov, pairs, widened = table.get(ef, (1.0, 1e9, 0.0))
        return PointResult(params.for_k(k), cov, 0.001, pairs, 1.0, 1.0, widened)

    monkeypatch.setattr(cal_mod, "evaluate_point", fake)
    pt = calibrate_domain(_Engine(), None, np.arange(5), [], 10, ex_pairs=2000, ex_p50=10.0,
                          cfg=CalibrateConfig(target=0.99, **FAST))
    assert asked == [3, 5, 8, 15, 10] and pt.ef[-1] == 10 and pt.pairs == 100  # 3 and 5 paid a second search


def test_exhaustive_when_the_graph_is_not_cheaper(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_points(monkeypatch, {10: (0.995, 900, 12.0)})
    cfg = CalibrateConfig(target=0.99, **FAST, **NO_RETIME)
    pt = calibrate_domain(_Engine(), None, np.arange(5), [], 10, ex_pairs=1000, ex_p50=8.0, cfg=cfg)
    assert pt.mode == "exhaustive" and pt.coverage == 1.0 and pt.pairs == 1000
    assert "not 1.2x faster than scoring the domain whole" in pt.reason
    assert pt.graph_coverage == 0.995


def test_exhaustive_when_no_point_reaches_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_points(monkeypatch, {10: (0.5, 100, 1.0), 20: (0.6, 200, 1.0), 40: (0.7, 400, 1.0), 80: (0.8, 800, 1.0),
                               160: (0.9, 1600, 1.0)})
    cfg = CalibrateConfig(target=0.99, **FAST)
    pt = calibrate_domain(_Engine(), None, np.arange(5), [], 10, ex_pairs=1500, ex_p50=9.0, cfg=cfg)
    assert pt.mode == "exhaustive" and "no graph point reached coverage 0.99" in pt.reason


def test_engine_serves_exhaustive_where_calibrated_so(calibrated) -> None:
    bundle = load_bundle(calibrated[0])
    points = {name: tuple(replace(p, mode="exhaustive") for p in pts) for name, pts in bundle.calibration.domains.items()}
    b = replace(bundle, calibration=replace(bundle.calibration, domains=points))
    engine = MatchEngine(b, providers=["CPUExecutionProvider"])
    from contracts.features import UserFeatures

    res = engine.match(UserFeatures.cold_start(b.schema), 0, 10)
    assert res.mode == "exhaustive" and res.stats.pair_evaluations == engine.eligible_count(0)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="target"):
        CalibrateConfig(target=1.5)
    with pytest.raises(ValueError, match="k values"):
        CalibrateConfig(ks=(0,))


def test_cli_calibrates_a_bundle_and_answers_bad_input_in_one_line(calibrated, tmp_path: Path, capsys) -> None:
    from unimatch.cli import main

    copy = tmp_path / "b"
    shutil.copytree(calibrated[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("calibration")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "cal.json"
    rc = main(["index", "calibrate", "--bundle", str(copy), "--data", str(calibrated[1]), "--queries", "20",
               "--k", "10", "--calibration-json", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["domains"]["domain_0"][0]["k"] == 10
    assert load_bundle(copy).calibration is not None
    assert main(["index", "calibrate", "--bundle", str(copy), "--data", str(calibrated[1]), "--target", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "unimatch: error: --target must be in (0, 1], got 2.0"
    before = (copy / "manifest.json").read_text()
    for flag in (["--calibration-json", str(tmp_path)], ["--calibration-json", str(tmp_path / "no" / "c.json")]):
        assert main(["index", "calibrate", "--bundle", str(copy), "--data", str(calibrated[1]), *flag]) == 2
        assert main(["index", "build", "--bundle", str(copy), "--data", str(calibrated[1]), *flag]) == 2
    assert (copy / "manifest.json").read_text() == before  # refused before any work: nothing rewritten
    assert "--calibration-json" in capsys.readouterr().err.strip().splitlines()[-1]


def test_index_build_with_data_calibrates_through_the_cli(calibrated, tmp_path: Path) -> None:
    """`index build --data` runs `index calibrate` on the new graph with the calibration flags it was given."""
    from unimatch.cli import main

    copy = tmp_path / "b"
    shutil.copytree(calibrated[0], copy)
    out = tmp_path / "cal.json"
    rc = main(["index", "build", "--bundle", str(copy), "--M", "8", "--ef-construction", "40", "--health-queries", "10",
               "--data", str(calibrated[1]), "--queries", "20", "--k", "10", "--target", "0.9",
               "--calibration-json", str(out)])
    assert rc == 0
    cal = load_bundle(copy).calibration
    assert cal is not None and cal.target == 0.9 and cal.queries <= 20
    assert {p.k for pts in cal.domains.values() for p in pts} == {10}
    assert json.loads(out.read_text())["target"] == 0.9
    with pytest.raises(SystemExit) as bad:  # a bad --k is refused by argparse before the build starts
        main(["index", "build", "--bundle", str(copy), "--data", str(calibrated[1]), "--k", "10,x"])
    assert bad.value.code == 2


def test_screening_decides_on_the_full_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A combination that looks good on the screening quarter is re-measured on every query."""
    asked: list[tuple[int, int]] = []
    full = {10: 0.95, 15: 0.985, 20: 0.995, 30: 0.999}
    screen = {10: 0.992, 15: 0.995, 20: 0.999, 30: 1.0}

    def fake(engine, q, idx, k, ref, params: SearchParams) -> PointResult:
        ef = params.for_k(k).ef[-1]
        asked.append((ef, idx.size))
        cov = (full if idx.size == 200 else screen).get(ef, 1.0)
        return PointResult(params.for_k(k), cov, 0.001, float(ef * 10), 1.0, 1.0)

    monkeypatch.setattr(cal_mod, "evaluate_point", fake)
    monkeypatch.setattr(cal_mod, "EF_LADDER", LADDER_FROM_K)
    cfg = CalibrateConfig(target=0.99, screen_queries=40, **FAST)
    pt = calibrate_domain(_Engine(), None, np.arange(200), [], 10, ex_pairs=5000, ex_p50=10.0, cfg=cfg)
    assert pt.mode == "graph" and pt.ef[-1] == 20 and pt.coverage == 0.995
    assert asked[0] == (10, 50)  # screened on a quarter
    assert [a for a in asked if a[1] == 200] == [(10, 200), (15, 200), (20, 200)]  # then walked up on all


def test_a_wider_buckets_point_serves_a_smaller_k_when_cheaper(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.calibrate import reuse_wider_points

    def fake(engine, q, idx, k, ref, params: SearchParams) -> PointResult:
        return PointResult(params.for_k(k), 0.995, 0.001, 400.0, 1.0, 1.0)  # the k=50 point, measured at k=10

    monkeypatch.setattr(cal_mod, "evaluate_point", fake)
    base = dict(coverage_ci95=0.001, latency_ms_p50=2.0, latency_ms_p99=2.0, exhaustive_pairs=5000,
                exhaustive_ms_p50=20.0, queries=50, reason="", steps=(1, 1, 2, 10), top_n=(8, 8, 16, 50))
    small = CalibratedPoint(k=10, mode="graph", coverage=0.991, pairs=1000, ef=(32, 8, 16, 40), **base)
    wide = CalibratedPoint(k=50, mode="graph", coverage=0.995, pairs=460, ef=(32, 8, 16, 75), **base)
    out = reuse_wider_points(_Engine(), None, np.arange(3), [], [small, wide], CalibrateConfig(**NO_RETIME), log=lambda m: None)
    assert out[0].k == 10 and out[0].ef == (32, 8, 16, 75) and out[0].pairs == 400 and "k=50 point" in out[0].reason
    assert out[1] == wide


def test_paired_timing_measures_both_modes_on_the_same_queries(calibrated) -> None:
    from service.calibrate import evaluate_point, paired_timing

    bundle_path, data, _ = calibrated
    engine = MatchEngine(load_bundle(bundle_path), params=SearchParams(), providers=["CPUExecutionProvider"])
    q = held_out_queries(data, engine.bundle, 20, 0, split="validation")
    idx = np.arange(len(q.features))
    ref = [engine.match(u, int(d), 10, mode="exhaustive").rows for u, d in zip(q.features, q.domains, strict=True)]
    point = evaluate_point(engine, q, idx, 10, ref, SearchParams())
    timed, ex_p50 = paired_timing(engine, q, idx, 10, point)
    assert timed.coverage == point.coverage and timed.pairs == point.pairs  # only the latencies are re-measured
    assert timed.ms_p50 > 0 and ex_p50 > 0


def test_reference_on_several_threads_keeps_order_and_times_the_first_alone() -> None:
    from service.calibrate import _map_ordered

    active, seen, peak = [0], [], [0]

    def fn(i: int):
        import time as _t

        active[0] += 1
        peak[0] = max(peak[0], active[0]) if i >= 3 else peak[0]
        if i < 3:
            assert active[0] == 1, "a timed query ran beside another"
        _t.sleep(0.01)
        active[0] -= 1
        seen.append(i)
        return i * 10

    out = list(_map_ordered(fn, np.arange(12), 4, sequential=3))
    assert out == [i * 10 for i in range(12)] and seen[:3] == [0, 1, 2]
    assert peak[0] > 1  # the untimed rest did run concurrently


def test_reference_times_at_most_its_seconds_alone_once_three_ran() -> None:
    from service.calibrate import _run_alone

    now = [0.0]

    def fn(i: int):
        now[0] += 4.0  # every exhaustive query "takes" 4 s on the fake clock
        return i

    # 10 s: the 3 first always, then stop once 10 s have passed (after the 3rd: 12 s)
    assert _run_alone(fn, np.arange(20), 20, 10.0, clock=lambda: now[0]) == [0, 1, 2]
    now[0] = 0.0
    assert _run_alone(fn, np.arange(20), 20, 30.0, clock=lambda: now[0]) == list(range(8))  # 28 s < 30 s: an 8th
    now[0] = 0.0
    assert _run_alone(fn, np.arange(20), 2, 30.0, clock=lambda: now[0]) == [0, 1]  # never more than `most`
    with pytest.raises(ValueError, match="timed_reference_queries"):
        CalibrateConfig(timed_reference_queries=0)


def test_calibration_is_the_same_on_one_or_several_threads(calibrated) -> None:
    bundle, data, _ = calibrated
    cfg = dict(target=0.99, queries=40, ks=(10,), **FAST)
    one = calibrate(load_bundle(bundle), data, CalibrateConfig(**cfg, workers=1, timed_reference_queries=5), log=lambda m: None)
    two = calibrate(load_bundle(bundle), data, CalibrateConfig(**cfg, workers=2, timed_reference_queries=5), log=lambda m: None)
    for name, points in one.domains.items():
        for a, b in zip(points, two.domains[name], strict=True):
            # the graph point found depends on the reference rows only (the mode also on timings)
            assert (a.k, a.graph_coverage, a.graph_pairs, a.queries) == (b.k, b.graph_coverage, b.graph_pairs, b.queries)


def test_lockstep_batch_serves_each_request_its_calibrated_point(calibrated) -> None:
    from service.engine import EngineRequest

    bundle_path, data, _ = calibrated
    engine = MatchEngine(load_bundle(bundle_path), providers=["CPUExecutionProvider"])
    assert engine.calibration is not None
    q = held_out_queries(data, engine.bundle, 12, 2, split="test")
    reqs = [EngineRequest(user=u, domain=int(d), k=(10, 50)[i % 2])
            for i, (u, d) in enumerate(zip(q.features, q.domains, strict=True))]
    points = {engine.calibrated(r.domain, r.k) for r in reqs}
    assert len(points) > 1  # the batch mixes operating points
    for r, got in zip(reqs, engine.match_many(reqs), strict=True):
        want = engine.match(r.user, r.domain, r.k)
        assert got.mode == want.mode
        np.testing.assert_array_equal(got.rows, want.rows)
        np.testing.assert_array_equal(got.scores, want.scores)


def test_a_narrow_beam_gives_the_same_answer_in_every_search_loop(calibrated) -> None:
    from contracts.features import UserFeatures

    bundle = load_bundle(calibrated[0])
    user = UserFeatures.cold_start(bundle.schema)
    narrow = SearchParams(ef=(4, 2, 2, 20), steps=(1, 1, 1, 10), top_n=(8, 8, 8, 50), bottom_ef_floor=False)
    got = {loop: MatchEngine(bundle, providers=["CPUExecutionProvider"], search_loop=loop).match(
        user, 0, 50, params=narrow, mode="graph") for loop in ("fused", "compiled", "numpy")}
    assert not got["fused"].stats.widened and got["fused"].rows.size == 50
    for loop in ("compiled", "numpy"):
        np.testing.assert_array_equal(got[loop].rows, got["fused"].rows)
        assert got[loop].stats.pair_evaluations == got["fused"].stats.pair_evaluations
