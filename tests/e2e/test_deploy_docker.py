"""Dockerfile, .dockerignore and docker-compose.yml, proven without a Docker engine (none on these machines).

hadolint lints the Dockerfile; the compose file is validated against the Compose specification's JSON
schema (the copy check-jsonschema vendors as ``vendor.compose-spec``, from
github.com/compose-spec/compose-spec, ``schema/compose-spec.json``); the commands the containers run
are parsed by the real CLI parser; the Grafana dashboard queries only ``unimatch_`` metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.e2e.deploy_helpers import ROOT, check_cli_argv, declared_metrics, unimatch_argv, venv_tool

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


def _stages() -> dict[str, list[str]]:
    """Dockerfile stage name -> its instruction lines (continuations joined), in file order."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(2), [])
        if current is not None:
            current.append(line)
    return stages


def test_hadolint_clean(tmp_path: Path) -> None:
    proc = subprocess.run([venv_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = subprocess.run([venv_tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_dockerfile_targets() -> None:
    stages = _stages()
    assert {"serve", "gpu", "train"} <= set(stages)
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE), (
        "a `# syntax=` line makes BuildKit pull a frontend image: the build fails offline"
    )

    def body(name: str) -> str:
        return "\n".join(stages[name])

    # slim serving: python slim base, [serve] only, non-root, healthcheck on /healthz, `unimatch serve`
    assert "python:3.11-slim" in DOCKERFILE.read_text()
    assert re.search(r'pip install [^\n]*"\.\[serve\]"', body("build-serve"))
    assert "torch" not in body("serve")
    for name in ("serve", "gpu"):
        b = body(name)
        assert re.search(r"^USER 10001", b, re.MULTILINE), name
        assert "HEALTHCHECK" in b and "/healthz" in b, name
        assert 'ENTRYPOINT ["unimatch", "serve"]' in b, name
    assert "nvidia/cuda" in stages["build-gpu"][0] or "CUDA_IMAGE" in stages["build-gpu"][0]
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', body("build-gpu"))
    assert re.search(r'pip install [^\n]*"\.\[train,serve\]"', body("build-train"))
    # hnswlib is source-only: the train builder has a compiler, built without -march=native
    assert re.search(r"apt-get install [^\n]*\bg\+\+", body("build-train"))
    assert "HNSWLIB_NO_NATIVE=1" in body("build-train")
    assert "apt-get" not in body("train") and "g++" not in body("serve"), "no compiler in a runtime image"
    assert re.search(r"^USER 10001", body("train"), re.MULTILINE)
    # versions come from pyproject's extras: no `pkg==x` pins typed into the Dockerfile
    for line in DOCKERFILE.read_text().splitlines():
        if "pip install" in line:
            assert "==" not in line, line


def _dependencies(stages: dict[str, list[str]], name: str) -> set[str]:
    """Stages ``name`` needs: its FROM parent and COPY --from sources, transitively."""
    direct = {stages[name][0].split()[1]} | {
        m.group(1) for line in stages[name] if (m := re.match(r"COPY\s+--from=(\S+)", line))
    }
    out = {d for d in direct if d in stages}
    for d in list(out):
        out |= _dependencies(stages, d)
    return out


@pytest.mark.parametrize("target", ["serve", "train", "gpu"])
def test_stage_order_lets_the_legacy_builder_build_only_what_a_target_needs(target: str) -> None:
    """The legacy builder builds every stage up to --target in file order: all of them must be needed,
    except the `serve` pair before `train` (small, and cached by compose's own serve build)."""
    stages = _stages()
    order = list(stages)
    needed = _dependencies(stages, target)
    before = set(order[: order.index(target)])
    assert needed <= before, f"{target} needs a stage that comes after it: {needed - before}"
    allowed_extra = {"serve"} if target == "train" else set()
    if target == "gpu":  # the last stage: what precedes it and it does not need are the CPU images
        allowed_extra = {"build-serve", "serve", "build-train", "train"}
    assert before - needed <= allowed_extra, f"--target {target} also builds {before - needed}"


def test_dockerignore_lets_every_package_in() -> None:
    """Each COPY source is whitelisted, and every package of pyproject's find-include is copied."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**" in ignore, ".dockerignore must start from 'exclude everything'"
    copies: set[str] = set()
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line)
        if m:
            copies.update(m.group(1).split())
    copies = {c.rstrip("/") for c in copies}
    assert copies and copies <= allowed, copies - allowed
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copies, f"packages not copied into the image: {packages - copies}"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_matches_the_compose_spec_schema() -> None:
    proc = _validate_compose(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    doc = _compose()
    doc["services"]["unimatch"]["depends_on"]["init"]["condition"] = "service_finished"
    doc["services"]["redis"]["healthcheck"]["retries"] = "many"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(doc))
    assert _validate_compose(bad).returncode != 0


def test_compose_wiring() -> None:
    doc = _compose()
    services = doc["services"]
    assert {"redis", "init", "unimatch", "locust", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name} mounts missing path {src}"
            else:
                assert src in doc["volumes"], f"{name} uses undeclared volume {src}"
    assert "healthcheck" in services["redis"]
    assert services["unimatch"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "init": {"condition": "service_completed_successfully"},
    }
    assert services["init"]["build"]["target"] == "train"
    assert services["unimatch"]["build"]["target"] == "serve"
    assert "bundles:/bundles:ro" in services["unimatch"]["volumes"]
    assert "bundles:/bundles" in services["init"]["volumes"]
    env = services["unimatch"]["environment"]
    assert {"UNIMATCH_BUNDLE", "UNIMATCH_REDIS_URL", "UNIMATCH_ADMIN_TOKEN"} <= set(env)
    # Redis: a password (through stdin, not argv) and maxmemory; both clients use the password
    redis_script = services["redis"]["command"][0]
    assert "requirepass $$REDIS_PASSWORD" in redis_script and "--maxmemory " in redis_script
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == services["redis"]["environment"]["REDIS_PASSWORD"]
    for name in ("init", "unimatch"):
        assert services[name]["environment"]["UNIMATCH_REDIS_URL"].startswith("redis://:${UNIMATCH_REDIS_PASSWORD")
    # the service follows the pointer the init job publishes
    assert env["UNIMATCH_BUNDLE"] == "/bundles/current" and env["UNIMATCH_BUNDLE_WATCH"] == "true"
    assert "bundle_watch publish" in services["init"]["command"][0]
    assert services["locust"]["profiles"] == ["loadtest"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    for name in ("redis", "init", "unimatch"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"


def test_compose_init_commands_parse() -> None:
    """The init job's `unimatch ...` lines use commands and flags the CLI really has."""
    init = _compose()["services"]["init"]
    env = {k: str(v).split(":-")[-1].rstrip("}") for k, v in init["environment"].items()}
    argvs = [a for line in init["command"][0].splitlines() if (a := unimatch_argv(line.strip(), env))]
    assert [a[0] for a in argvs] == ["data", "train", "export", "index", "features"]
    check_cli_argv(argvs)


def test_grafana_dashboard_and_prometheus_config() -> None:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/unimatch.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    metrics = set()
    for e in exprs:
        metrics.update(re.findall(r"\b(unimatch_[a-z_]+)", e))
    assert metrics, "dashboard queries nothing"
    assert all(m.startswith("unimatch_") for m in metrics)
    for base in ("unimatch_request_duration_seconds", "unimatch_errors_total", "unimatch_redis_duration_seconds"):
        assert any(m.startswith(base) for m in metrics), base
    # every family the dashboard queries is one service/metrics.py declares
    declared = declared_metrics()
    families = {re.sub(r"_(bucket|sum|count)$", "", m) if m not in declared else m for m in metrics}
    assert families <= declared, f"dashboard queries metrics the service does not export: {families - declared}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "unimatch:8000" in targets
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == dash["panels"][0]["datasource"]["uid"]


@pytest.mark.parametrize("name", ["serve", "gpu"])
def test_image_serve_command_parses(name: str) -> None:
    """ENTRYPOINT + CMD of the serving images are accepted by the real `unimatch serve` parser."""
    lines = _stages()[name]
    entry = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT") :])
    cmd = json.loads(next(line for line in lines if line.startswith("CMD"))[len("CMD") :])
    assert entry[0] == "unimatch"
    check_cli_argv([entry[1:] + cmd])
