"""The runner's engine-alone measurement on a small torch-free bundle (tests/fixtures/fake_bundle.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("hnswlib")

from loadtests.run import measure_engine  # noqa: E402
from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset  # noqa: E402


def test_measure_engine_on_a_fake_bundle(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path / "bundle", num_entities=2000, num_domains=2)
    data = make_fake_dataset(tmp_path / "data", bundle, num_users=50)
    users = [str(u) for u in np.load(data / "users" / "external_id.npy")]
    out = measure_engine(bundle, data, users, seconds=0.5, threads=2, seed=0, domains="", ks="10:1,50:1")
    assert out["threads"] == 2 and out["matches"] > 20
    assert 0 < out["p50_ms"] <= out["p99_ms"]
    assert out["throughput_rps_1thread"] > 0 and out["throughput_rps_parallel"] > 0
    # one thread, back to back: throughput and mean latency agree within the tail's pull on the mean
    assert out["throughput_rps_1thread"] <= 1e3 / out["p50_ms"] * 1.5
