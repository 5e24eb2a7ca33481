"""The CI grid for real: every method of Tables III and IV trains, is tuned, evaluated and rendered.

Runs ``experiments/configs/ci_tiny.json`` (tiny synthetic preset, a few steps per run, a 2-value
learning-rate grid) through the real trainer and evaluator in-process. It checks plumbing and the
shape of what is published, not model quality: a few steps cannot rank methods.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.backends import LibraryBackend
from experiments.config import load_config, method_label
from experiments.render import read_uwl_weights, render
from experiments.runner import result_path, run_experiment

CONFIG = Path(__file__).parents[2] / "experiments" / "configs" / "ci_tiny.json"


@pytest.mark.timeout(600)  # ~30 s of CPU; generous for a shared machine
def test_ci_grid_trains_every_method_and_renders(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    lines: list[str] = []
    report = run_experiment(
        cfg, tmp_path / "exp", backend=LibraryBackend(), data_root=tmp_path / "data", log=lines.append
    )
    assert not report.failed and report.pending == 0
    assert report.done == len(cfg.methods) * (len(cfg.tuning.lrs) + len(cfg.seeds))
    fp = cfg.fingerprint()
    for method in cfg.methods:
        sel = json.loads((tmp_path / "exp" / "tune" / fp / "synth-tiny" / method / "selected.json").read_text())
        assert sel["lr"] in cfg.tuning.lrs
        res = json.loads(result_path(tmp_path / "exp", fp, "synth-tiny", method, 0).read_text())
        assert res["split"] == "test" and res["lr"] == sel["lr"] and res["reused_tuning_run"]
        rec = res["recall_all"]
        assert set(rec) == {"domain_0", "domain_1", "domain_2", "domain_3", "average"}
        for n in cfg.eval.n:
            assert 0.0 <= rec["average"][str(n)] <= 1.0
        # Recall-all@N cannot fall as N grows (the top-N lists are nested).
        avg = [rec["average"][str(n)] for n in sorted(cfg.eval.n)]
        assert avg == sorted(avg)
    # Resume: a second call finds everything done and trains nothing.
    again = run_experiment(
        cfg, tmp_path / "exp", backend=LibraryBackend(), data_root=tmp_path / "data", log=lines.append
    )
    assert again.done == 0 and again.skipped == report.done

    written = render(tmp_path / "exp")
    md = (tmp_path / "exp" / "tables-ci_tiny.md").read_text()
    for method in cfg.methods:
        assert f"| {method_label(method)} | 1/1 |" in md
    assert written["ci_tiny/fig4"].read_bytes()[:4] == b"\x89PNG"
    assert written["ci_tiny/fig5"].read_bytes()[:4] == b"\x89PNG"
    # Fig. 5 reads the UWL weights the trainer logged: four auxiliary losses, learned (not constant).
    rrl = json.loads(result_path(tmp_path / "exp", fp, "synth-tiny", "backbone-rrl", 0).read_text())
    series = read_uwl_weights(Path(rrl["run_dir"]))
    assert set(series) == {"dal_shared", "dal_specific", "wasserstein", "ortho"}
    assert all(len(pts) == cfg.train.max_steps for pts in series.values())
    assert any(pts[0][1] != pts[-1][1] for pts in series.values())
