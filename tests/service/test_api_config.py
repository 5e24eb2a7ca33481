"""Settings from UNIMATCH_* variables, the serve/features CLI, and start-up failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.app import create_app
from service.config import Settings


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNIMATCH_BUNDLE", str(tmp_path))
    monkeypatch.setenv("UNIMATCH_SEARCH_EF", "8, 16,32,64")
    monkeypatch.setenv("UNIMATCH_SEARCH_STEPS", "1,1,1,2")
    monkeypatch.setenv("UNIMATCH_ADMIN_TOKEN", "")  # empty means disabled, not an empty password
    monkeypatch.setenv("UNIMATCH_REDIS_URL", " ")
    monkeypatch.setenv("UNIMATCH_WORKERS", "2")
    monkeypatch.setenv("UNIMATCH_MAX_K", "50")
    s = Settings()
    assert s.bundle == tmp_path and s.search_ef == (8, 16, 32, 64) and s.search_steps == (1, 1, 1, 2)
    assert s.admin_token is None and s.redis_url is None and s.max_k == 50
    assert s.workers * s.effective_scoring_threads * s.intra_op_threads <= max(s.cores, 2)


@pytest.mark.parametrize(
    ("name", "value"),
    [("UNIMATCH_MAX_K", "0"), ("UNIMATCH_SEARCH_EF", "8,x"), ("UNIMATCH_SEARCH_TOP_N", "-1,2"), ("UNIMATCH_PROVIDERS", "tpu")],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        Settings()


def test_search_settings_reach_the_engine(bundle_dir: Path, dataset_dir: Path) -> None:
    from fastapi.testclient import TestClient

    settings = Settings(bundle=bundle_dir, data=dataset_dir, search_ef=(4, 8, 16, 32), search_exhaustive_threshold=0)
    with TestClient(create_app(settings)) as c:
        params = c.get("/v1/info").json()["search"]["search_params"]
        assert params["ef"] == [4, 8, 16, 32] and params["exhaustive_threshold"] == 0
        assert params["steps"]  # not given: the engine's default


def test_batch_requests_setting_reaches_the_engine(bundle_dir: Path, dataset_dir: Path) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(bundle=bundle_dir, data=dataset_dir, batch_requests=True))) as c:
        assert c.get("/v1/info").json()["search"]["scorer"] == "BatchingScorer"
        assert c.post("/match", json={"user_id": "nobody", "domain": "domain_0", "k": 5}).status_code == 200
    with TestClient(create_app(Settings(bundle=bundle_dir, data=dataset_dir))) as c:  # CPU default: off
        assert c.get("/v1/info").json()["search"]["scorer"] == "HostGatherScorer"


def test_start_without_a_bundle_fails_clearly() -> None:
    app = create_app(Settings(bundle=None))

    async def run() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="UNIMATCH_BUNDLE"):
        asyncio.run(run())


def test_without_any_feature_store_every_user_is_cold_start(bundle_dir: Path) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(bundle=bundle_dir))) as c:
        body = c.post("/match", json={"user_id": "user-0001", "domain": "domain_0", "k": 4}).json()
        assert body["cold_start"] is True and len(body["items"]) == 4
        assert c.get("/v1/info").json()["feature_store"]["kind"] == "none"


def test_cli_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unimatch.cli import main

    assert main(["serve", "--bundle", str(tmp_path)]) == 2
    assert "not a bundle" in capsys.readouterr().err
    assert main(["features", "load", "--data", str(tmp_path / "missing"), "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert "not a dataset" in capsys.readouterr().err


@pytest.mark.redis
def test_cli_features_load_reports_throughput(dataset_dir: Path, redis_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.service.conftest import REDIS_URL
    from unimatch.cli import main

    assert main(["features", "load", "--data", str(dataset_dir), "--redis-url", REDIS_URL, "--prefix", redis_prefix]) == 0
    out = capsys.readouterr().out
    assert "users/s" in out and "loaded 120 users" in out


def test_docs_list_every_setting_and_metric() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from service import metrics

    doc = (Path(__file__).parents[2] / "docs/service.md").read_text()
    missing = [f"UNIMATCH_{name.upper()}" for name in Settings.model_fields if f"`UNIMATCH_{name.upper()}`" not in doc]
    assert not missing, f"docs/service.md lacks {missing}"
    # counters are registered without their "_total" suffix
    names = [m._name + ("_total" if m._type == "counter" else "") for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(names) >= 10
    assert not [n for n in names if f"`{n}`" not in doc], names


def test_empty_path_settings_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNIMATCH_BUNDLE", "UNIMATCH_DATA", "UNIMATCH_CONTROL_DIR"):
        monkeypatch.setenv(name, "")
    s = Settings()
    assert s.bundle is None and s.data is None and s.control_dir is None  # not Path("") == the cwd


def test_serve_takes_its_bundle_from_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unimatch.cli import main

    monkeypatch.setenv("UNIMATCH_BUNDLE", "")
    assert main(["serve", "--port", "9"]) == 2
    assert "no bundle: pass --bundle BUNDLE or set UNIMATCH_BUNDLE" in capsys.readouterr().err
    monkeypatch.setenv("UNIMATCH_BUNDLE", str(tmp_path / "nowhere"))
    assert main(["serve", "--port", "9"]) == 2
    assert f"{tmp_path / 'nowhere'}: not a bundle (no manifest.json)" in capsys.readouterr().err
    monkeypatch.setenv("UNIMATCH_MAX_K", "0")  # one invalid setting: refused before anything starts
    assert main(["serve", "--bundle", str(tmp_path), "--port", "9"]) == 2
    assert "invalid UNIMATCH_* setting" in capsys.readouterr().err


def test_features_load_reads_redis_url_and_prefix_through_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.data.synth import generate, preset
    from unimatch.cli import main

    data = generate(preset("tiny"), tmp_path / "data")
    monkeypatch.setenv("UNIMATCH_REDIS_URL", "redis://:secret@127.0.0.1:1/0")  # nothing listens on port 1
    assert main(["features", "load", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://***@127.0.0.1:1/0" in err and "secret" not in err
    # the flag wins over the setting
    assert main(["features", "load", "--data", str(data), "--redis-url", "redis://127.0.0.1:2/0"]) == 2
    assert "cannot reach Redis at redis://127.0.0.1:2/0" in capsys.readouterr().err
    monkeypatch.setenv("UNIMATCH_REDIS_KEY_PREFIX", "x" * 65)  # over the setting's 64-character limit
    assert main(["features", "load", "--data", str(data)]) == 2
    assert "invalid UNIMATCH_* setting" in capsys.readouterr().err
