"""Closed-set config fields: the orthogonality mode is an Enum, the device a Literal; both keep their strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import ConfigError, OrthoMode, RRLConfig, TrainConfig, method_config
from unimatch.cli import main


def test_ortho_mode_string_becomes_the_enum_and_round_trips_as_the_string(tmp_path: Path) -> None:
    rrl = RRLConfig(ortho=True, ortho_mode="difference")  # type: ignore[arg-type]  # as config.json spells it
    assert rrl.ortho_mode is OrthoMode.DIFFERENCE
    cfg = method_config("backbone-ortho", data=tmp_path / "d", out=tmp_path / "r", rrl=rrl)
    saved = cfg.to_json()
    assert saved["rrl"]["ortho_mode"] == "difference"  # config.json keeps the string
    assert TrainConfig.from_json(saved).rrl.ortho_mode is OrthoMode.DIFFERENCE
    assert RRLConfig().ortho_mode is OrthoMode.PAPER


def test_unknown_ortho_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="rrl.ortho_mode must be 'paper' or 'difference', got 'bogus'"):
        RRLConfig(ortho_mode="bogus")  # type: ignore[arg-type]


def test_unknown_device_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda, got 'tpu'"):
        method_config("dnn", data=tmp_path / "d", out=tmp_path / "r", device="tpu")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), "--method", "dnn", "--out", str(tmp_path / "r"), "--device", "tpu"])
    assert exc.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_synth_preset_names_are_the_presets() -> None:
    from typing import get_args

    from model.data import SynthPreset
    from model.data.synth import PRESETS

    assert set(get_args(SynthPreset)) == set(PRESETS)


def test_experiment_config_refuses_an_unknown_preset_or_importer() -> None:
    from experiments.config import ExperimentConfigError, parse_config

    base = {"name": "t", "kind": "comparison", "reference": "dnn", "methods": ["dnn"], "seeds": [0],
            "tuning": {"lrs": [0.001]}}
    for spec, field in (({"source": "synth", "preset": "huge"}, "preset"),
                        ({"source": "import", "importer": "netflix"}, "importer")):
        with pytest.raises(ExperimentConfigError, match=rf"datasets\.0\.{field}"):
            parse_config({**base, "datasets": [{"name": "x", **spec}]})
