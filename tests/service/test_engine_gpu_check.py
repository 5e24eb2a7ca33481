"""benchmarks/gpu_check.py and benchmarks/gpu_device.py on CPU: the torch scorer rebuilt from the run
must score exactly like the exported ONNX graph under onnxruntime, and the device driver's stages
must run end to end at tiny sizes (the GPU itself is only exercised on the lent machine)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from contracts.bundle import load_bundle
from service.scoring.host import HostGatherScorer

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


def _module(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/, run/ (a few steps of backbone-rrl), bundle/ (exported, with its graph): gpu_device's layout."""
    from index_builder.build import build_index
    from index_builder.config import IndexConfig
    from model.config import LossConfig, ModelConfig, method_config
    from model.data.synth import SynthConfig, generate
    from model.export import ExportConfig, export
    from model.train import train

    w = tmp_path_factory.mktemp("gpu")
    generate(SynthConfig(num_users=60, num_entities=300, num_interactions=3000, max_seq_len=10), w / "data")
    model = ModelConfig(embed_dim=8, cat_dim=4, domain_dim=4, ad_hidden=(16,), transformer_ff=16, expert_dims=(16, 8),
                        tower_dims=(8, 1))
    train(method_config("backbone-rrl", data=w / "data", out=w / "run", batch_size=32, max_steps=3, progress=False,
                        valid_users=0, model=model, loss=LossConfig(num_sampled=8), threads=1))
    export(ExportConfig(run=w / "run", out=w / "bundle"))
    build_index(bundle=w / "bundle", cfg=IndexConfig(health_queries=10))
    return w


def _ctx(host: HostGatherScorer, i: int, domain: int) -> object:
    seq = np.full(10, -1, dtype=np.int64)
    seq[-3:] = [4 + i, 9, 200]
    return host.encode(np.array([(i + j) % 2 for j in range(len(host.bundle.schema.user_categorical))]),
                       np.zeros(len(host.bundle.schema.user_numeric), np.float32) + 0.1 * i, seq, domain)


@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-5), ("bf16", 5e-2), ("fp16", 5e-3)])
def test_torch_pair_scorer_matches_onnxruntime(work: Path, precision: str, tol: float) -> None:
    ts = _module("torch_scorer")
    b = load_bundle(work / "bundle", verify_checksums=False)
    host = HostGatherScorer(b)
    sc = ts.TorchPairScorer(work / "run", b.entity_tensors, "cpu", precision)
    rows = np.arange(0, 300, 2, dtype=np.int64)
    for dom in range(b.schema.num_domains):
        ctx = _ctx(host, 1, dom)
        want = host.score(ctx, rows)
        got = sc.score(sc.user_feeds(ctx.feeds, ctx.domain), rows)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_batched_torch_scorer_equals_separate_calls(work: Path) -> None:
    ts = _module("torch_scorer")
    b = load_bundle(work / "bundle", verify_checksums=False)
    host = HostGatherScorer(b)
    sc = ts.TorchPairScorer(work / "run", b.entity_tensors, "cpu", "fp32")
    ctxs = [_ctx(host, i, i % b.schema.num_domains) for i in range(3)]
    stacked = sc.user_feeds({n: np.concatenate([c.feeds[n] for c in ctxs]) for n in sc.user_output_names},
                            np.array([c.domain for c in ctxs]))
    rows = torch.arange(30).reshape(3, 10) * 7
    got = sc.score_batched_device(stacked, rows).numpy()
    for i, c in enumerate(ctxs):
        np.testing.assert_allclose(got[i], host.score(c, rows[i].numpy()), rtol=1e-5, atol=1e-5)


def test_gpu_check_torch_path_on_cpu_writes_json(work: Path, tmp_path: Path) -> None:
    gc = _module("gpu_check")
    out = tmp_path / "gpu.json"
    assert gc.main([str(work / "bundle"), "--out", str(out), "--queries", "4", "--seconds", "0.05", "--torch-device",
                    "cpu", "--batches", "64", "--threads", "1", "--users-per-call", "2", "--pairs", "16", "--k", "10",
                    "--precisions", "fp32"]) == 0
    res = json.loads(out.read_text())
    t = res["torch"]["fp32"]
    assert t["max_abs_diff_vs_onnxruntime_cpu"] < 1e-5
    assert t["eager"][0]["pairs_per_s"] > 0 and t["end_to_end"][0]["queries"] == 4 and t["batched"][0]["users"] == 2


def test_gpu_check_without_the_run_says_so(work: Path, tmp_path: Path) -> None:
    gc = _module("gpu_check")
    out = tmp_path / "gpu.json"
    assert gc.main([str(work / "bundle"), "--out", str(out), "--torch-device", "cpu", "--run", str(tmp_path / "nope")]) == 0
    assert "not found" in json.loads(out.read_text())["torch"]["error"]


def test_gpu_device_stages_dry_run(work: Path, tmp_path: Path) -> None:
    """The driver's scorer and search stages on CPU at tiny sizes, against the fixture's run and bundle."""
    gd = _module("gpu_device")
    out = tmp_path / "out"
    assert gd.main(["--tiny", "--device", "cpu", "--work", str(work), "--out", str(out),
                    "--stages", "scorer,search"]) == 0
    res = json.loads((out / "gpu_device.json").read_text())
    assert res["stages"]["scorer"]["status"] == "ok" and res["stages"]["search"]["status"] == "ok", res["stages"]
    assert {r["precision"] for r in res["scorer"]["runs"]} == {"fp32", "bf16", "fp16"}
    assert res["scorer"]["max_abs_diff_vs_onnxruntime_cpu"]["fp32"] < 1e-5
    assert [r["batch"] for r in res["search"]["per_request"]] == [1, 4]
    lock = res["search"]["lockstep"]  # the service's lockstep search, driven by the device scorer
    assert lock and all(r["qps"] > 0 and r["path"] == "service.lockstep.search_many" for r in lock)
    md = (out / "gpu_device.md").read_text()
    assert "## Pair scorer" in md and "## End-to-end search" in md


def test_gpu_device_budget_skips_a_stage_with_the_reason(work: Path, tmp_path: Path) -> None:
    gd = _module("gpu_device")
    out = tmp_path / "out"
    assert gd.main(["--tiny", "--device", "cpu", "--work", str(work), "--out", str(out), "--stages", "scorer",
                    "--budget-s", "1"]) == 0
    st = json.loads((out / "gpu_device.json").read_text())["stages"]["scorer"]["status"]
    assert st.startswith("skipped:") and "budget" in st


def test_time_training_measures_and_skips(work: Path, tmp_path: Path) -> None:
    bt = _module("bench_train")
    rec = bt.time_training(work / "data", "backbone", 32, "shared+bf16+prefetch", steps=1, warmup=1, device="cpu",
                           shared_m=8, negatives=8, max_pairs=10**6, work=tmp_path, threads=1)
    assert rec["status"] == "ok" and rec["examples_per_s"] > 0 and rec["candidates_per_example"] == 1 + 8 + 8
    big = bt.time_training(work / "data", "backbone", 32, "today", steps=1, warmup=1, device="cpu", shared_m=8,
                           negatives=8, max_pairs=100, work=tmp_path)
    assert big["status"].startswith("skipped") and "examples_per_s" not in big
    with pytest.raises(SystemExit, match="unknown variant"):
        bt.parse_variant("shared+fp8")
