"""`unimatch index score-space` and `index build --space scores`: a graph over vectors + probe-user scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contracts.bundle import load_bundle
from service.engine import MatchEngine, SearchError
from service.score_space import GRAPH_VECTORS_FILE, probe_profiles, score_space_vectors
from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset
from unimatch.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("score-space")
    bundle = make_fake_bundle(root / "bundle", num_entities=1500, seed=5)
    data = make_fake_dataset(root / "data", bundle, num_users=120, seed=5)
    vectors_before = (bundle / "entities/vectors.npy").read_bytes()
    assert main(["index", "build", "--bundle", str(bundle), "--space", "scores", "--data", str(data),
                 "--probe-users", "16", "--k", "10", "--queries", "20"]) == 0
    assert (bundle / "entities/vectors.npy").read_bytes() == vectors_before  # never modified
    return bundle, data


def test_build_over_the_score_space_writes_it_checksummed_and_serves(built: tuple[Path, Path]) -> None:
    bundle, _ = built
    manifest = json.loads((bundle / "manifest.json").read_text())
    space = manifest["graph_space"]
    vectors = np.load(bundle / GRAPH_VECTORS_FILE)
    b = load_bundle(bundle)  # checksums, graph validation
    assert manifest["graph"]["space"] == "scores" and space["file"] == GRAPH_VECTORS_FILE
    assert vectors.shape == (b.num_entities, b.vectors.shape[1] + space["probe_users"]) == (1500, space["dim"])
    assert GRAPH_VECTORS_FILE in manifest["files"] and "calibration" in manifest  # calibrated after the build
    engine = MatchEngine(b)
    q = engine.match(_user(b), 0, 10)
    assert q.rows.size == 10


def test_each_block_weighs_the_same_and_profiles_are_standardised(built: tuple[Path, Path]) -> None:
    bundle, data = built
    b = load_bundle(bundle)
    prof, p = probe_profiles(b, data, 8, seed=1, workers=2)
    assert prof.shape == (b.num_entities, p) and p == 8
    np.testing.assert_allclose(prof.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(prof.std(axis=0), 1.0, atol=1e-3)
    again, _ = probe_profiles(b, data, 8, seed=1, workers=1)
    np.testing.assert_array_equal(prof, again)  # same probe users, same scores, whatever the threads
    out = score_space_vectors(np.asarray(b.vectors), prof)
    d = b.vectors.shape[1]
    assert np.linalg.norm(out[:, :d], axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    assert np.linalg.norm(out[:, d:], axis=1).mean() == pytest.approx(1.0, rel=1e-5)


def test_live_changes_are_refused_on_a_score_space_graph(built: tuple[Path, Path]) -> None:
    bundle, _ = built
    with pytest.raises(SearchError, match="live changes need a graph over the entity vectors"):
        MatchEngine(load_bundle(bundle), live_capacity=10)


def test_scores_space_without_data_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_fake_bundle(tmp_path / "b", num_entities=300, seed=1, with_graph=False)
    assert main(["index", "build", "--bundle", str(bundle), "--space", "scores"]) == 2
    assert "--space scores needs --data" in capsys.readouterr().err
    assert main(["index", "build", "--bundle", str(bundle), "--probe-users", "4"]) == 2
    assert not (bundle / "graph").exists()


def _user(b):  # a plain user of the fake schema: zeros and an empty history
    from contracts.features import PAD, UserFeatures

    s = b.schema
    return UserFeatures(cat=np.zeros(len(s.user_categorical), np.int64), num=np.zeros(len(s.user_numeric), np.float32),
                        seq=np.full(s.max_seq_len, PAD, np.int64))


# ---- --space auto: both graphs built and calibrated, the cheaper kept ----------------------------------
def _cal(pairs: dict[tuple[str, int], float]):
    from contracts.calibration import CalibratedPoint, Calibration

    domains: dict[str, list] = {}
    for (d, k), n in pairs.items():
        domains.setdefault(d, []).append(CalibratedPoint(
            k=k, mode="graph", coverage=0.995, coverage_ci95=0.002, pairs=n, latency_ms_p50=1.0, latency_ms_p99=2.0,
            exhaustive_pairs=1e4, exhaustive_ms_p50=10.0, queries=20, reason="test"))
    return Calibration(target=0.99, graph="g", domains={d: tuple(p) for d, p in domains.items()})


def test_choose_space_weighs_each_point_alike_and_a_tie_keeps_vectors() -> None:
    from index_builder.space_choice import choose_space

    vectors = _cal({("a", 10): 100, ("a", 1000): 10_000, ("b", 10): 100})
    # Fewer pairs at the two small points, more at k=1000: a sum would pick vectors, each point alike scores.
    scores = _cal({("a", 10): 25, ("a", 1000): 12_000, ("b", 10): 50})
    c = choose_space(vectors, scores)
    assert c.chosen == "scores" and c.ratio == pytest.approx((0.25 * 1.2 * 0.5) ** (1 / 3))
    assert len(c.points) == 3
    assert choose_space(vectors, vectors).chosen == "vectors"  # tie: the space that takes live changes
    near = _cal({("a", 10): 95, ("a", 1000): 9_500, ("b", 10): 95})  # 0.95x: within the calibrations' noise
    assert choose_space(vectors, near).chosen == "vectors" and choose_space(vectors, near).ratio == pytest.approx(0.95)
    assert choose_space(vectors, _cal({("a", 10): 400, ("b", 10): 100})).chosen == "vectors"  # common points only
    with pytest.raises(ValueError, match="no \\(domain, k\\) point"):
        choose_space(vectors, _cal({("c", 10): 1}))


@pytest.mark.parametrize("forced", ["vectors", "scores"])
def test_space_auto_keeps_the_cheaper_graph_whole_and_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    import index_builder.space_choice as sc
    from contracts.calibration import graph_fingerprint, load_calibration

    real = sc.choose_space
    seen = {}

    def force(v, s):  # the real comparison, then the outcome under test
        c = real(v, s)
        seen["real"] = c
        return sc.SpaceChoice(chosen=forced, ratio=c.ratio, points=c.points)

    monkeypatch.setattr(sc, "choose_space", force)
    bundle = make_fake_bundle(tmp_path / "bundle", num_entities=800, seed=3, with_graph=False)
    data = make_fake_dataset(tmp_path / "data", bundle, num_users=80, seed=3)
    mine = tmp_path / "notes.txt"
    mine.write_text("a user's file beside the bundle")
    vectors_before = (bundle / "entities/vectors.npy").read_bytes()
    assert main(["index", "build", "--bundle", str(bundle), "--space", "auto", "--data", str(data),
                 "--probe-users", "8", "--k", "10", "--queries", "16",
                 "--calibration-json", str(tmp_path / "cal.json")]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graph"]["space"] == forced and manifest["graph"]["space_choice"]["chosen"] == forced
    assert manifest["graph"]["space_choice"]["points"] and seen["real"].points
    cal = load_calibration(bundle / "calibration.json")
    assert cal.graph == graph_fingerprint(manifest)  # the calibration is of the graph that was kept
    assert json.loads((tmp_path / "cal.json").read_text())["graph"] == cal.graph
    assert (bundle / "entities/vectors.npy").read_bytes() == vectors_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "cal.json", "data", "notes.txt"]  # copy removed
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]
    b = load_bundle(bundle)  # checksums and graph validation
    assert MatchEngine(b).match(_user(b), 0, 10).rows.size == 10
