"""Alert rules (deploy/prometheus/alerts.yml), the same groups in the Kubernetes PrometheusRule, and
the Grafana dashboard's queries: all name only metrics the service exports.

``promtool`` (Debian's ``prometheus`` package) checks the rules and runs their unit tests
(deploy/prometheus/alerts.test.yml: each alert fires on a bad series and stays quiet on a healthy one)
where it is installed; CI without it still checks structure, equality and metric names.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.e2e import kustomize_lite
from tests.e2e.deploy_helpers import ROOT, declared_metrics

RULES = ROOT / "deploy/prometheus/alerts.yml"
ALERTS = {"UniMatchHigh5xxRate", "UniMatchP99OverDeadline", "UniMatchDegradedShare", "UniMatchSearchCoverageBelowCalibration"}


def families(exprs: list[str], declared: set[str]) -> set[str]:
    found = {m for e in exprs for m in re.findall(r"\b(unimatch_[a-z_0-9]+)", e)}
    return {re.sub(r"_(bucket|sum|count)$", "", m) if m not in declared else m for m in found}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_the_alerts_exist_with_severity_and_a_for_duration() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in {"page", "warning"}, r["alert"]
        assert re.fullmatch(r"\d+m", r["for"]), r["alert"]
        assert r["annotations"]["summary"], r["alert"]


def test_rules_query_only_exported_metrics() -> None:
    declared = declared_metrics()
    got = families([r["expr"] for r in _rules()], declared)
    assert got <= declared, f"alerts query metrics the service does not export: {got - declared}"
    coverage = next(r["expr"] for r in _rules() if r["alert"] == "UniMatchSearchCoverageBelowCalibration")
    assert "unimatch_search_shadow_coverage_sum[1h]" in coverage and "unimatch_search_shadow_coverage_count[1h]" in coverage
    assert "unimatch_search_calibrated_coverage" in coverage and "> 0.02" in coverage


def test_kubernetes_prometheusrule_carries_the_same_groups() -> None:
    (rule,) = kustomize_lite.render(ROOT / "k8s/monitoring")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_compose_prometheus_loads_the_rules() -> None:
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["prometheus"]["volumes"])
    for path in prom["rule_files"]:
        assert mounts.get("./deploy/prometheus/alerts.yml") == path


def test_dashboard_queries_exported_metrics_and_shows_coverage() -> None:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/unimatch.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    declared = declared_metrics()
    assert families(exprs, declared) <= declared
    panel = next(p for p in dash["panels"] if "coverage" in p["title"].lower())
    joined = " ".join(t["expr"] for t in panel["targets"])
    assert "unimatch_search_shadow_coverage_sum" in joined and "unimatch_search_calibrated_coverage" in joined


promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    assert promtool is not None
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    assert test.returncode == 0, test.stdout + test.stderr
