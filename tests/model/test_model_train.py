"""Training: every method lowers the loss, resume is exact, mismatched schemas are refused, DDP agrees."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from model.checkpoint import CheckpointError, load_run
from model.config import METHODS, ConfigError, LossConfig, ModelConfig, method_config
from model.data.synth import SynthConfig, generate
from model.losses import Candidates
from model.train import Trainer, train

TINY = ModelConfig(
    embed_dim=8, cat_dim=4, domain_dim=4, ad_hidden=(16,), transformer_heads=2, transformer_ff=16,
    expert_dims=(16, 8), tower_dims=(8, 1), num_experts=4, dselect_k=2, two_tower_dim=8,
)


def tiny_config(data: Path, out: Path, method: str = "backbone", **kw: object) -> object:
    base = {
        "data": data, "out": out, "batch_size": 32, "lr": 5e-3, "progress": False, "model": TINY,
        "loss": LossConfig(num_sampled=16), "checkpoint_every": 1000, "threads": 1,
    }
    base.update(kw)
    return method_config(method, **base)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    return generate(SynthConfig(num_users=60, num_entities=300, num_interactions=3000, max_seq_len=10), out)


@pytest.fixture(scope="module")
def other_schema_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data3") / "tiny3"
    return generate(SynthConfig(num_users=60, num_entities=300, num_interactions=3000, max_seq_len=10, num_domains=3), out)


def _fixed_ce(t: Trainer, rows: np.ndarray, cand: Candidates) -> float:
    with torch.no_grad():
        t.objective.eval()
        user_cat, user_num, seq, domain, _ = t.make_batch(rows)
        _, parts = t.objective(user_cat, user_num, seq, domain, cand)
    return float(parts["ce"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_few_steps_lower_the_loss(method: str, data: Path, tmp_path: Path) -> None:
    t = Trainer(tiny_config(data, tmp_path / "run", method, max_steps=25))
    rows = t.batch_rows(0, 0)
    _, _, _, domain, pos = t.make_batch(rows)
    cand = t.sampler.candidates(pos, domain)
    before = _fixed_ce(t, rows, cand)
    # the same positives every step (negatives still sampled): a few steps must fit them, for every method
    t.batch_rows = lambda epoch, index: rows  # type: ignore[method-assign]
    t.run()
    after = _fixed_ce(t, rows, cand)
    assert after < before - 0.05, f"{method}: {before:.3f} -> {after:.3f}"
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 25 and {"step", "ce", "loss", "ce_domain", "examples_per_s"} <= set(lines[-1])
    rrl = METHODS[method].rrl
    if rrl.dal:
        assert "dal_shared" in lines[-1] and "dal_specific" in lines[-1] and "aux_weights" in lines[-1]
    if rrl.mvwdl:
        assert "wasserstein" in lines[-1] and "gradient_penalty" in lines[-1]
    if rrl.adversarial:
        assert "adversarial" in lines[-1]
    if rrl.any_aux:
        assert (tmp_path / "run" / "aux_losses.png").is_file()


def test_history_never_contains_the_target_or_test_interactions(data: Path, tmp_path: Path) -> None:
    t = Trainer(tiny_config(data, tmp_path / "run", max_steps=1))
    ex = t.examples
    rows = t.batch_rows(0, 0)
    _, _, seq, _, _ = t.make_batch(rows)
    for r, s in zip(rows, seq.numpy(), strict=True):
        hist = s[s >= 0]
        start = ex.user_start[r]
        np.testing.assert_array_equal(hist, ex.entity[max(start, r - len(s)) : r][-len(hist) :] if len(hist) else hist)
        assert len(hist) == min(r - start, len(s))


def test_resume_continues_exactly(data: Path, tmp_path: Path) -> None:
    straight = train(tiny_config(data, tmp_path / "a", "backbone-rrl", max_steps=6))
    train(tiny_config(data, tmp_path / "b", "backbone-rrl", max_steps=3))
    resumed = train(tiny_config(data, tmp_path / "b", "backbone-rrl", max_steps=6))
    sa = torch.load(straight / "checkpoint.pt", weights_only=True)
    sb = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 6
    for name, value in sa["objective"].items():
        torch.testing.assert_close(value, sb["objective"][name], msg=name)
    steps = [json.loads(x)["step"] for x in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_for_another_schema_is_refused(data: Path, other_schema_data: Path, tmp_path: Path) -> None:
    run = train(tiny_config(data, tmp_path / "run", max_steps=1))
    with pytest.raises(CheckpointError, match="schema"):
        load_run(run, data=other_schema_data)
    with pytest.raises(CheckpointError, match="schema"):
        train(tiny_config(other_schema_data, tmp_path / "run", max_steps=2))


def test_bad_configs_are_clear_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        method_config("nope", data=data, out=tmp_path)
    with pytest.raises(ConfigError, match="RRL"):
        method_config("mmoe", data=data, out=tmp_path, rrl=METHODS["backbone-rrl"].rrl)
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_run(tmp_path / "missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, cfg_json: dict, out: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    )
    from model.config import TrainConfig

    t = Trainer(TrainConfig.from_json(cfg_json))
    t.run()
    torch.save(t.objective.state_dict(), Path(out) / f"rank{rank}.pt")
    t.close()  # the production teardown (model.train.train): DDP freed before the group is destroyed


# A hang here (a rank stuck in teardown) must fail this test, not stall CI until its global limit.
@pytest.mark.timeout(300)
def test_two_process_ddp_replicas_agree(data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data, tmp_path / "run", "backbone-rrl", max_steps=3)
    cfg = dataclasses.replace(cfg, threads=1)
    # fork: the children inherit the imported torch instead of re-importing it (spawn took ~50 s here)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), cfg.to_json(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = Trainer(dataclasses.replace(cfg, out=tmp_path / "fresh")).objective.state_dict()
    moved = 0
    for name, value in s0.items():
        torch.testing.assert_close(value, s1[name], msg=name)
        moved += int(not torch.equal(value, init[name]))
    assert moved > 0  # the replicas trained, and stayed identical
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


@pytest.fixture(scope="module")
def short_epoch_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An epoch of only a few batches of 32, so a budget of 25 steps spans several epochs."""
    out = tmp_path_factory.mktemp("short") / "short"
    return generate(SynthConfig(num_users=40, num_entities=120, num_interactions=400, max_seq_len=6), out)


def test_max_steps_trains_exactly_n_steps_over_several_epochs(
    short_epoch_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unimatch.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", str(short_epoch_data), "--method", "dnn", "--out", str(run), "--max-steps", "25",
                 "--batch-size", "32", "--negatives", "8", "--embed-dim", "8", "--threads", "1", "--no-progress"]) == 0
    summary = json.loads((run / "run.json").read_text())
    per_epoch = summary["steps_per_epoch"]
    assert 1 <= per_epoch < 25  # the point of the test: one epoch is shorter than the budget
    assert summary["steps"] == 25
    assert summary["epochs"] == pytest.approx(25 / per_epoch)
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    epochs = {json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()}
    assert steps == list(range(1, 26)) and epochs == set(range(math.ceil(25 / per_epoch)))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 25
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"25 steps = {25 / per_epoch:.2f} epochs of {per_epoch} steps" in last
    assert f"; validation Recall-all@50 {summary['valid_recall_all_best']:.4f} at step 25" in last


def test_epochs_without_max_steps_train_whole_epochs(short_epoch_data: Path, tmp_path: Path) -> None:
    t = Trainer(tiny_config(short_epoch_data, tmp_path / "run", "dnn", epochs=3, valid_users=0))
    t.run()
    assert t.step == 3 * t.steps_per_epoch
    assert json.loads((tmp_path / "run" / "run.json").read_text())["valid_recall_all_best"] is None


def test_early_stop_keeps_the_best_checkpoint(short_epoch_data: Path, tmp_path: Path) -> None:
    import model.train as train_mod

    # A scripted validation curve (the real one on noise-sized data is not predictable): best at
    # the second check, then two checks without gain end the run with patience 2.
    curve = iter([0.10, 0.30, 0.20, 0.25, 0.9, 0.9])
    cfg = tiny_config(short_epoch_data, tmp_path / "run", "dnn", max_steps=40, early_stop=True, patience=2, eval_every=3)
    t = Trainer(cfg)
    real = train_mod.Trainer.validate
    t.validate = lambda: (real(t), next(curve))[1]  # type: ignore[method-assign]
    t.run()
    assert t.step == 12 and t.best["stopped"] and t.best["step"] == 6
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["early_stopped"] and summary["best_step"] == 6 and summary["valid_recall_all_best"] == 0.30
    checks = [json.loads(x) for x in (tmp_path / "run" / "valid.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [3, 6, 9, 12]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["step"] == 6
    loaded = load_run(tmp_path / "run")
    assert loaded.checkpoint == "best.pt" and loaded.state["step"] == 6
    # a fresh run into the same directory without --early-stop drops the stale best.pt it wrote
    train(tiny_config(short_epoch_data, tmp_path / "run", "dnn", max_steps=2, resume=False))
    assert not (tmp_path / "run" / "best.pt").exists()
    assert load_run(tmp_path / "run").checkpoint == "checkpoint.pt"


def test_resumed_early_stop_rejudges_patience(short_epoch_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(short_epoch_data, tmp_path / "run", "dnn", max_steps=40, early_stop=True, patience=1, eval_every=2)
    t = Trainer(cfg)
    curve = iter([0.5, 0.4] + [0.1] * 30)
    t.validate = lambda: next(curve)  # type: ignore[method-assign]
    t.run()
    assert t.step == 4 and t.best["stopped"]
    # the same command again: still stopped, no step trained
    again = Trainer(cfg)
    again.validate = lambda: 0.1  # type: ignore[method-assign]
    again.run()
    assert again.step == 4
    # a larger patience continues from the checkpoint, keeping the best so far (0.5 at step 2)
    more = Trainer(dataclasses.replace(cfg, patience=3))
    more.validate = lambda: 0.2  # type: ignore[method-assign]
    more.run()
    assert more.step == 8 and more.best["step"] == 2 and more.best["recall"] == 0.5


def test_early_stop_needs_validation_interactions(tmp_path: Path) -> None:
    from model.data.mapping import import_mapping

    rows = [f"u{u},e{(u * 7 + i) % 30},{i}" for u in range(20) for i in range(5)]
    (tmp_path / "log.csv").write_text("user,ad,ts\n" + "\n".join(rows) + "\n")
    (tmp_path / "m.json").write_text(json.dumps({
        "interactions": {"file": "log.csv", "user": "user", "entity": "ad", "timestamp": "ts"},
        "split": {"n_valid": 0},
    }))
    data = import_mapping(tmp_path / "m.json", tmp_path / "d")
    with pytest.raises(ValueError, match="needs validation interactions"):
        Trainer(tiny_config(data, tmp_path / "run", "dnn", max_steps=3, early_stop=True))
