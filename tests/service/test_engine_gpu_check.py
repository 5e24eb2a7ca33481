"""benchmarks/gpu_check.py: its ONNX->PyTorch interpreter must score exactly like onnxruntime (run on CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from contracts.bundle import load_bundle
from service.scoring.host import HostGatherScorer
from tests.fixtures.fake_bundle import make_fake_bundle

torch = pytest.importorskip("torch")


def _gpu_check():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fp16", [False, True])
def test_torch_pair_scorer_matches_onnxruntime(tmp_path: Path, fp16: bool) -> None:
    gc = _gpu_check()
    b = load_bundle(make_fake_bundle(tmp_path / "b", num_entities=300, dim=8))
    host = HostGatherScorer(b)
    sc = gc.TorchPairScorer(b, torch.device("cpu"), fp16=fp16)
    seq = np.full(8, -1, dtype=np.int64)
    seq[-3:] = [4, 9, 200]
    ctx = host.encode(np.array([1, 2]), np.array([0.3, -1.0], np.float32), seq, 1)
    rows = np.arange(0, 300, 2, dtype=np.int64)
    want = host.score(ctx, rows)
    got = sc.score(sc.user_feeds(ctx), rows)
    tol = 5e-2 if fp16 else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_gpu_check_without_cuda_writes_json(tmp_path: Path) -> None:
    import json

    gc = _gpu_check()
    b = make_fake_bundle(tmp_path / "b", num_entities=200, dim=8)
    out = tmp_path / "gpu.json"
    assert gc.main([str(b), "--out", str(out), "--queries", "4", "--seconds", "0.1"]) == 0
    res = json.loads(out.read_text())
    assert res["onnxruntime_providers"] and res["catalogue_size"] == 200
    if not torch.cuda.is_available():
        assert res["path"].startswith("torch-cuda") and "error" in res["torch"]


def test_vmap_batches_users_like_separate_calls(tmp_path: Path) -> None:
    gc = _gpu_check()
    b = load_bundle(make_fake_bundle(tmp_path / "b", num_entities=120, dim=8))
    host = HostGatherScorer(b)
    sc = gc.TorchPairScorer(b, torch.device("cpu"), fp16=False)
    users = [host.encode(np.array([i % 5, i % 3]), np.zeros(2, np.float32), np.full(8, -1, np.int64), i % 2) for i in range(3)]
    feeds = [sc.user_feeds(u) for u in users]
    stacked = {k: torch.stack([f[k] for f in feeds]) for k in feeds[0]}
    rows = torch.arange(30).reshape(3, 10)
    got = torch.vmap(lambda u, r: sc.score_device(u, r))(stacked, rows)
    for i, u in enumerate(users):
        np.testing.assert_allclose(got[i].numpy(), host.score(u, rows[i].numpy()), rtol=1e-5, atol=1e-5)
