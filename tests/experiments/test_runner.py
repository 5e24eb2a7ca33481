"""Runner and renderer on a fake backend: resume, staleness, learning-rate choice, deadline, tables, plots.

The fake backend stands in for training (which the CI-grid test in ``test_ci_tiny.py`` exercises for
real) so these tests can pin exact numbers: every recall is a known function of (method, seed, lr).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from experiments.config import ExperimentConfigError, load_config, parse_config
from experiments.render import Cell, effect_over_se, read_uwl_weights, render, summarise, table_markdown
from experiments.runner import plan, result_path, select_lr, tune_path, validation_view
from experiments.runner import run_experiment as _run_experiment

METHOD_SCORE = {"dnn": 0.20, "ple": 0.22, "backbone": 0.24, "backbone-rrl": 0.26}


class FakeBackend:
    """Recall = method score + 0.01 * seed (+0.05 on validation for the 'good' lr), two domains."""

    def __init__(self, good_lr: float = 0.01, fail_method: str | None = None) -> None:
        self.good_lr = good_lr
        self.fail_method = fail_method
        self.trained: list[tuple[str, int, float]] = []
        self.evaluated: list[tuple[str, str]] = []
        self.prepared = 0

    def prepare(self, spec: Any, out: Path) -> Path:
        from model.data.synth import generate, preset

        self.prepared += 1
        return generate(preset("tiny"), out)

    def train(self, *, data: Path, method: str, out: Path, seed: int, lr: float, epochs: Any, max_steps: Any,
              options: dict[str, Any], threads: Any) -> None:  # fmt: skip
        if method == self.fail_method:
            raise RuntimeError("diverged")
        self.trained.append((method, seed, lr))
        out.mkdir(parents=True)
        (out / "meta.json").write_text(json.dumps({"method": method, "seed": seed, "lr": lr}))
        if method == "backbone-rrl":
            with (out / "log.jsonl").open("w") as fh:
                for step in range(1, 11):
                    weights = {
                        "dal_shared": 1 / step,
                        "dal_specific": 0.5,
                        "wasserstein": 0.3 + step / 100,
                        "ortho": 0.2,
                    }
                    fh.write(json.dumps({"step": step, "loss": 1.0, "aux_weights": weights}) + "\n")
                fh.write(json.dumps({"step": 11, "loss": 0.9}) + "\n")  # a line without weights is skipped

    def evaluate(self, *, run: Path, data: Path, ns: list[int], max_users: Any, seed: int) -> dict:
        meta = json.loads((run / "meta.json").read_text())
        split = "validation" if data.name.endswith(".valid-as-test") else "test"
        self.evaluated.append((meta["method"], split))
        base = METHOD_SCORE[meta["method"]] + 0.01 * meta["seed"]
        if split == "validation" and meta["lr"] == self.good_lr:
            base += 0.05
        rec = {"d0": {str(n): base * n / 200 for n in ns}, "d1": {str(n): base * n / 100 / 2 for n in ns}}
        rec["average"] = {str(n): (rec["d0"][str(n)] + rec["d1"][str(n)]) / 2 for n in ns}
        return rec


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny dataset (and its validation view) for the whole module: generating it per test is slow."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def _share_data(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    global DATA_ROOT
    DATA_ROOT = shared_data


DATA_ROOT: Path | None = None


def run_experiment(cfg: Any, out: Path, **kw: Any) -> Any:
    kw.setdefault("data_root", DATA_ROOT)
    kw.setdefault("log", lambda s: None)
    return _run_experiment(cfg, out, **kw)


def make_cfg(**over: Any) -> Any:
    raw: dict[str, Any] = {
        "name": "t3",
        "kind": "comparison",
        "reference": "dnn",
        "datasets": [{"name": "toy", "source": "synth", "preset": "tiny"}],
        "methods": ["dnn", "ple", "backbone", "backbone-rrl"],
        "seeds": [0, 1, 2],
        "train": {"epochs": 1, "max_steps": 5},
        "tuning": {"lrs": [0.001, 0.01], "metric_n": 50, "seed": 0},
        "eval": {"n": [20, 50, 200], "table_n": 50, "max_users": 100},
    }
    raw.update(over)
    return parse_config(raw)


def test_runs_every_cell_then_resumes_without_training(tmp_path: Path) -> None:
    cfg = make_cfg()
    be = FakeBackend()
    rep = run_experiment(cfg, tmp_path, backend=be)
    # 4 methods x 2 lrs tuning + 4 x 3 seeds final, minus the 4 reused tuning trainings.
    assert len(be.trained) == 4 * 2 + 4 * 3 - 4
    assert rep.done == 4 * 2 + 4 * 3 and rep.pending == 0 and not rep.failed
    for m in cfg.methods:
        for s in cfg.seeds:
            res = json.loads(result_path(tmp_path, cfg.fingerprint(), "toy", m, s).read_text())
            assert res["split"] == "test" and res["lr"] == 0.01
            assert res["recall_all"]["average"]["200"] == pytest.approx(METHOD_SCORE[m] + 0.01 * s)
    be2 = FakeBackend()
    rep2 = run_experiment(cfg, tmp_path, backend=be2)
    assert be2.trained == [] and be2.evaluated == [] and rep2.skipped == 4 * 2 + 4 * 3 and rep2.done == 0

    # A lost result file is the only run done again.
    result_path(tmp_path, cfg.fingerprint(), "toy", "ple", 2).unlink()
    be3 = FakeBackend()
    run_experiment(cfg, tmp_path, backend=be3)
    assert be3.trained == [("ple", 2, 0.01)]


def test_changed_budget_makes_results_stale(tmp_path: Path) -> None:
    run_experiment(make_cfg(), tmp_path, backend=FakeBackend())
    be = FakeBackend()
    run_experiment(make_cfg(train={"epochs": 1, "max_steps": 6}), tmp_path, backend=be)
    assert len(be.trained) == 16
    assert plan(make_cfg(train={"epochs": 1, "max_steps": 6}), tmp_path)["finished"] == 20


def test_learning_rate_chosen_on_validation(tmp_path: Path) -> None:
    be = FakeBackend(good_lr=0.001)
    run_experiment(make_cfg(), tmp_path, backend=be)
    fp = make_cfg().fingerprint()
    sel = json.loads((tmp_path / f"tune/{fp}/toy/ple/selected.json").read_text())
    assert sel["lr"] == 0.001 and sel["by_lr"]["0.001"] > sel["by_lr"]["0.01"]
    assert json.loads(tune_path(tmp_path, fp, "toy", "ple", 0.001).read_text())["split"] == "validation"
    assert {lr for _, _, lr in be.trained if True} == {0.001, 0.01}
    assert all(lr == 0.001 for m, s, lr in be.trained if s != 0)  # final seeds 1, 2 use the chosen rate
    assert select_lr({0.01: 0.3, 0.001: 0.3}) == 0.001  # a tie goes to the smaller rate
    with pytest.raises(ValueError):
        select_lr({})


def test_single_lr_grid_skips_tuning(tmp_path: Path) -> None:
    be = FakeBackend()
    run_experiment(make_cfg(tuning={"lrs": [0.003]}), tmp_path, backend=be)
    assert len(be.trained) == 12 and not (tmp_path / "tune").exists()
    assert plan(make_cfg(tuning={"lrs": [0.003]}), tmp_path)["trainings"] == 12


def test_deadline_starts_nothing_and_filters(tmp_path: Path) -> None:
    be = FakeBackend()
    rep = run_experiment(make_cfg(), tmp_path, backend=be, deadline=0.0)
    assert be.trained == [] and rep.pending == 4 * 2 + 4 * 3
    rep = run_experiment(make_cfg(), tmp_path, backend=be, only_methods=["dnn"])
    assert {m for m, _, _ in be.trained} == {"dnn"}
    with pytest.raises(ExperimentConfigError):
        run_experiment(make_cfg(), tmp_path, backend=be, only_methods=["nope"])
    be = FakeBackend()
    run_experiment(make_cfg(tuning={"lrs": [0.01]}), tmp_path / "s", backend=be, only_seeds=[2])
    assert {s for _, s, _ in be.trained} == {2} and len(be.trained) == 4
    with pytest.raises(ExperimentConfigError, match="seeds"):
        run_experiment(make_cfg(), tmp_path, backend=be, only_seeds=[7])


def test_keep_going_records_failure(tmp_path: Path) -> None:
    be = FakeBackend(fail_method="ple")
    with pytest.raises(RuntimeError):
        run_experiment(make_cfg(), tmp_path / "a", backend=be)
    rep = run_experiment(make_cfg(), tmp_path / "b", backend=FakeBackend(fail_method="ple"), keep_going=True)
    assert len(rep.failed) == 2 and all("ple" in f for f in rep.failed)  # its two tuning runs
    fp = make_cfg().fingerprint()
    assert not result_path(tmp_path / "b", fp, "toy", "ple", 0).exists()
    assert result_path(tmp_path / "b", fp, "toy", "dnn", 0).exists()


def test_tables_share_common_runs(tmp_path: Path) -> None:
    run_experiment(make_cfg(seeds=[0]), tmp_path, backend=FakeBackend())
    be = FakeBackend()
    t4 = make_cfg(name="t4", kind="ablation", reference="backbone", methods=["backbone", "backbone-rrl"], seeds=[0, 1])
    run_experiment(t4, tmp_path, backend=be)
    assert sorted(be.trained) == [("backbone", 1, 0.01), ("backbone-rrl", 1, 0.01)]  # seed 0 came from t3
    written = render(tmp_path)
    assert {"t3/tables", "t4/tables", "t3/fig4", "t4/fig5"} <= set(written)
    assert "Table IV analog" in (tmp_path / "tables-t4.md").read_text()


def test_render_tables_numbers_and_plots(tmp_path: Path) -> None:
    cfg = make_cfg()
    run_experiment(cfg, tmp_path, backend=FakeBackend())
    written = render(tmp_path)
    md = (tmp_path / "tables-t3.md").read_text()
    # DNN average@50 over seeds 0,1,2: (0.20, 0.21, 0.22) * 50/200 -> mean 0.0525, std 0.0025.
    assert "| DNN | 3/3 | 0.01 |" in md and "0.0525 ± 0.0025" in md
    # Backbone&RRL: mean 0.26+0.01 = 0.27 vs DNN 0.21 -> +28.57 %.
    rrl_row = next(line for line in md.splitlines() if line.startswith("| Backbone&RRL |"))
    assert "+28.57%" in rrl_row
    summary = summarise(cfg, tmp_path)
    ple = summary["datasets"]["toy"]["methods"]["ple"]["recall_all"]["average"]["200"]
    assert ple["mean"] == pytest.approx(0.23) and ple["std"] == pytest.approx(0.01) and len(ple["values"]) == 3
    assert json.loads((tmp_path / "results-t3.json").read_text())["kind"] == "comparison"
    for key in ("t3/fig4", "t3/fig5"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_paired_change_and_tuning_table(tmp_path: Path) -> None:
    cfg = make_cfg()
    run_experiment(cfg, tmp_path, backend=FakeBackend())
    render(tmp_path)
    md = (tmp_path / "tables-t3.md").read_text()
    # PLE vs DNN seed by seed at average@50: 0.22/0.20, 0.23/0.21, 0.24/0.22 -> +10.0, +9.52, +9.09 %:
    # mean +9.54 %, sd 0.455 points, paired t = 9.54 / (0.455 / sqrt 3) = +36.3.
    ple_row = next(line for line in md.splitlines() if line.startswith("| PLE |"))
    assert ple_row.endswith("| +9.5% (+36.3) |")
    assert next(line for line in md.splitlines() if line.startswith("| DNN |")).endswith("| – | – |")
    # Tuning table: validation average@50 = (score + 0.05 for the good lr) * 0.25, the chosen rate in bold.
    assert "| DNN | 0.0500 | **0.0625** |" in md
    assert "| Backbone&RRL | 0.0650 | **0.0775** |" in md
    summary = summarise(cfg, tmp_path)
    toy = summary["datasets"]["toy"]
    assert toy["tuning"]["ple"] == {"0.001": pytest.approx(0.055), "0.01": pytest.approx(0.0675)}
    paired = toy["methods"]["ple"]["paired_change_vs_reference"]["50"]
    assert paired["mean"] == pytest.approx((0.1 + 0.23 / 0.21 - 1 + 0.24 / 0.22 - 1) / 3)
    assert paired["t"] == pytest.approx(36.3, abs=0.1)
    assert "paired_change_vs_reference" not in toy["methods"]["dnn"]


def test_render_partial_grid_shows_missing_cells(tmp_path: Path) -> None:
    cfg = make_cfg(tuning={"lrs": [0.01]})
    run_experiment(cfg, tmp_path, backend=FakeBackend(), only_methods=["ple", "backbone"])
    md = table_markdown(cfg, tmp_path)
    ple = next(line for line in md.splitlines() if line.startswith("| PLE |"))
    assert "n/a" in ple and "| DNN |" not in md  # no reference run: no relative change invented
    assert "t3/fig5" not in render(tmp_path)  # no Backbone&RRL run, no Fig. 5


def test_render_states_the_t_level_of_the_seeds_actually_paired(tmp_path: Path) -> None:
    cfg = make_cfg(tuning={"lrs": [0.01]})
    run_experiment(cfg, tmp_path / "two", backend=FakeBackend(), only_seeds=[0, 1])
    two = table_markdown(cfg, tmp_path / "two")
    assert "| PLE | 2/3 |" in two
    assert "its paired t (1 df: |t| > 12.7 is the two-sided 5% level)" in two and "4.3" not in two
    run_experiment(cfg, tmp_path / "three", backend=FakeBackend())
    assert "its paired t (2 df: |t| > 4.3 is the two-sided 5% level)" in table_markdown(cfg, tmp_path / "three")


def test_effect_over_se() -> None:
    a, ref = Cell((0.3, 0.31, 0.29)), Cell((0.2, 0.21, 0.19))
    assert effect_over_se(a, ref) == pytest.approx(0.1 / ((0.01**2 / 3 + 0.01**2 / 3) ** 0.5))
    assert effect_over_se(Cell((0.3,)), ref) is None


def test_uwl_log_reader(tmp_path: Path) -> None:
    (tmp_path / "log.jsonl").write_text('{"step": 1, "aux_weights": {"ortho": 0.5}}\n{"step": 2}\n')
    assert read_uwl_weights(tmp_path) == {"ortho": [(1, 0.5)]}
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match="no 'aux_weights'"):
        read_uwl_weights(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_uwl_weights(tmp_path / "missing")


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ({"reference": "mmoe"}, "reference"),
        ({"eval": {"n": [20, 50], "table_n": 200}}, "table_n"),
        ({"tuning": {"lrs": [0.0]}}, "lrs"),
        ({"datasets": [{"name": "x", "source": "import"}]}, "importer"),
        ({"sedes": [0]}, "sedes"),
        ({"seeds": [0, 0]}, "seeds repeat"),
    ],
)
def test_bad_config_one_line_error(over: dict[str, Any], msg: str) -> None:
    with pytest.raises(ExperimentConfigError, match=msg) as info:
        make_cfg(**over)
    assert "\n" not in str(info.value)


def test_shipped_configs_parse() -> None:
    configs = sorted((Path(__file__).parents[2] / "experiments" / "configs").glob("*.json"))
    assert {p.name.split("_")[0] for p in configs} >= {"table3", "table4", "ci"}
    for path in configs:
        cfg = load_config(path)
        assert cfg.reference == ("dnn" if cfg.kind == "comparison" else "backbone")


def test_cli_render_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unimatch.cli import main

    run_experiment(make_cfg(seeds=[0]), tmp_path / "exp", backend=FakeBackend())
    assert main(["experiment", "render", "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "tables-t3.md").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["experiment", "run", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["experiment", "render", "--out", str(tmp_path / "nothing")]) == 2


def test_validation_view_moves_validation_to_test(tmp_path: Path) -> None:
    import numpy as np

    from contracts.dataset import TEST, TRAIN, VALID, load_dataset
    from model.data.synth import generate, preset

    src = load_dataset(generate(preset("tiny"), tmp_path / "d"))
    view = load_dataset(validation_view(src.root, tmp_path / "v"))
    s, v = np.asarray(src.interactions.split), np.asarray(view.interactions.split)
    assert (v == TEST).sum() == (s == VALID).sum() > 0 and (v == VALID).sum() == 0
    assert (v == TRAIN).sum() == (s == TRAIN).sum()
    assert len(view.entities) == len(src.entities) and view.schema.fingerprint() == src.schema.fingerprint()

    # The view's test pairs are exactly the source's validation pairs.
    def pairs(ds: Any, lab: int) -> list[tuple[int, int]]:
        keep = np.asarray(ds.interactions.split) == lab
        users = np.asarray(ds.interactions.user)[keep].tolist()
        return sorted(zip(users, np.asarray(ds.interactions.entity)[keep].tolist(), strict=True))

    assert pairs(view, TEST) == pairs(src, VALID)


def test_fig4_legend_and_colours_with_a_partial_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last dataset has only DNN: the legend still names every method, colours stay per method."""
    import experiments.render as render_mod

    cfg = make_cfg(
        tuning={"lrs": [0.01]},
        seeds=[0],
        datasets=[{"name": "toy", "source": "synth", "preset": "tiny"}, {"name": "toy2", "source": "synth", "preset": "tiny"}],
    )  # fmt: skip
    run_experiment(cfg, tmp_path, backend=FakeBackend(), only_datasets=["toy"])
    run_experiment(cfg, tmp_path, backend=FakeBackend(), only_datasets=["toy2"], only_methods=["dnn", "backbone-rrl"])
    figs: list[Any] = []
    monkeypatch.setattr(render_mod, "_save_fig", lambda fig, png: figs.append(fig))
    render_mod.plot_recall_vs_n(cfg, tmp_path, tmp_path / "fig4.png")
    (fig,) = figs
    top = [ax for ax in fig.axes if ax.get_title() in ("toy", "toy2")]
    legend = top[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["DNN", "PLE", "Backbone", "Backbone&RRL"]

    def colours(ax: Any) -> dict[str, Any]:
        return {c.get_label(): c.lines[0].get_color() for c in ax.containers}

    full, part = colours(top[0]), colours(top[1])
    assert set(part) == {"DNN", "Backbone&RRL"}
    assert all(part[m] == full[m] for m in part)


def test_fig4_legend_in_config_order_when_the_first_panel_is_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import experiments.render as render_mod

    cfg = make_cfg(
        tuning={"lrs": [0.01]},
        seeds=[0],
        datasets=[{"name": "toy", "source": "synth", "preset": "tiny"}, {"name": "toy2", "source": "synth", "preset": "tiny"}],
    )  # fmt: skip
    run_experiment(cfg, tmp_path, backend=FakeBackend(), only_datasets=["toy"], only_methods=["dnn", "backbone-rrl"])
    run_experiment(cfg, tmp_path, backend=FakeBackend(), only_datasets=["toy2"])
    figs: list[Any] = []
    monkeypatch.setattr(render_mod, "_save_fig", lambda fig, png: figs.append(fig))
    render_mod.plot_recall_vs_n(cfg, tmp_path, tmp_path / "fig4.png")
    (fig,) = figs
    legend = next(ax for ax in fig.axes if ax.get_title() == "toy2").get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["DNN", "PLE", "Backbone", "Backbone&RRL"]
