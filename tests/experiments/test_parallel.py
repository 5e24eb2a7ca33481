"""`experiment run --workers N`: methods split by cost, workers are ordinary runs, results as sequential."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.config import load_config
from experiments.parallel import METHOD_COST, partition_methods
from experiments.runner import result_path
from unimatch.cli import main

CONFIG = Path(__file__).parents[2] / "experiments" / "configs" / "ci_tiny.json"
ALL = list(METHOD_COST)


def test_partition_covers_every_method_once_and_keeps_config_order() -> None:
    groups = partition_methods(ALL, 2)
    assert sorted(m for g in groups for m in g) == sorted(ALL)
    for g in groups:
        assert g == [m for m in ALL if m in g]


def test_partition_balances_cost() -> None:
    for workers in (2, 3, 4):
        loads = [sum(METHOD_COST[m] for m in g) for g in partition_methods(ALL, workers)]
        assert len(loads) == workers
        # Longest-first greedy is within one largest job of the best split.
        assert max(loads) - min(loads) <= max(METHOD_COST.values())


def test_partition_more_workers_than_methods_and_bad_count() -> None:
    assert partition_methods(["dnn", "ple"], 5) == [["ple"], ["dnn"]]
    assert partition_methods(["some-new-method"], 1) == [["some-new-method"]]  # unknown cost: default
    with pytest.raises(ValueError, match="workers must be >= 1"):
        partition_methods(["dnn"], 0)


def test_cli_refuses_bad_worker_count(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["experiment", "run", "--config", str(CONFIG), "--out", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_write_the_sequential_result_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, data = tmp_path / "exp", tmp_path / "data"
    argv = ["experiment", "run", "--config", str(CONFIG), "--out", str(out), "--data-root", str(data)]
    rc = main([*argv, "--method", "dnn", "--method", "ple", "--workers", "2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "worker 0: ple" in printed and "worker 1: dnn" in printed and "0 failed" in printed
    cfg = load_config(CONFIG)
    fp = cfg.fingerprint()
    for method in ("dnn", "ple"):
        res = json.loads(result_path(out, fp, "synth-tiny", method, 0).read_text())
        assert res["method"] == method and res["lr"] in cfg.tuning.lrs
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["worker-0.log", "worker-1.log"]
    assert "tune ple" in (out / "logs" / "worker-0.log").read_text()
    assert "| DNN | 1/1 |" in (out / "tables-ci_tiny.md").read_text()
    # The same call again is a resume: every worker finds its runs done (2 tuning runs + seed 0).
    assert main([*argv, "--method", "dnn", "--method", "ple", "--workers", "2", "--no-render"]) == 0
    assert "0 runs done, 3 already finished" in (out / "logs" / "worker-0.log").read_text().splitlines()[-1]
