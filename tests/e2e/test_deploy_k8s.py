"""Kubernetes manifests of k8s/, validated offline (no cluster on these machines).

Every kustomization (overlays cpu and gpu, the Jobs, the training job) is rendered by the small
renderer of ``kustomize_lite`` (cross-checked against ``kubectl kustomize`` where kubectl exists) and
every object is validated with kubernetes-validate in strict mode (unknown fields are errors) against
the oldest and newest Kubernetes versions we support. The PyTorchJob CRD is not in kubernetes-validate:
it is validated against k8s/training/pytorchjob.schema.json (written from the Kubeflow v1 API) and its
pod templates strictly as core/v1 PodTemplate objects.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.e2e import kustomize_lite
from tests.e2e.deploy_helpers import ROOT, check_cli_argv, torchrun_argv, unimatch_argv

K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["overlays/cpu", "overlays/gpu", "jobs", "training", "monitoring"]
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
PYTORCHJOB_SCHEMA = json.loads((K8S / "training/pytorchjob.schema.json").read_text())
PROMETHEUSRULE_SCHEMA = json.loads((K8S / "monitoring/prometheusrule.schema.json").read_text())
# The keys of the `unimatch-secrets` Secret, which no kustomization carries (docs/deploy.md creates it).
SECRET_KEYS = {"UNIMATCH_ADMIN_TOKEN", "REDIS_PASSWORD"}


def rendered(name: str) -> list[dict[str, Any]]:
    return kustomize_lite.render(K8S / name)


def by_key(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {kustomize_lite.key(o): o for o in rendered(name)}


def validate_strict(obj: dict[str, Any], version: str) -> None:
    if obj["kind"] == "PrometheusRule":
        jsonschema.validate(obj, PROMETHEUSRULE_SCHEMA)
        return
    if obj["kind"] == "PyTorchJob":
        jsonschema.validate(obj, PYTORCHJOB_SCHEMA)
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{obj['metadata']['name']}-{role.lower()}"},
                "template": replica["template"],
            }
            kubernetes_validate.validate(pod_template, version, strict=True)
        return
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_strictly(name: str, version: str) -> None:
    objs = rendered(name)
    assert objs
    for obj in objs:
        try:
            validate_strict(obj, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc}")


def test_raw_manifest_files_validate_strictly() -> None:
    """Each manifest file on its own (base included), before any overlay touches it."""
    files = [p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "patch" not in p.name]
    assert len(files) >= 12
    for path in files:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                validate_strict(obj, K8S_VERSIONS[-1])


def test_strict_validation_rejects_unknown_fields() -> None:
    dep = by_key("overlays/cpu")[("Deployment", "unimatch")]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(dep, K8S_VERSIONS[-1])
    job = by_key("training")[("PyTorchJob", "unimatch-train")]
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate_strict(job, K8S_VERSIONS[-1])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: kustomize_lite is not cross-checked")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60, check=True)
    theirs = {kustomize_lite.key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    assert by_key(name) == theirs


def _serving(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    dep = by_key(name)[("Deployment", "unimatch")]
    return dep, dep["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", ["overlays/cpu", "overlays/gpu"])
def test_serving_deployment_hardening(name: str) -> None:
    dep, pod = _serving(name)
    (c,) = pod["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] == c["resources"]["limits"], "requests must equal limits (Guaranteed QoS)"
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    bundle = volumes[mounts["/bundles"]["name"]]
    assert mounts["/bundles"]["readOnly"] is True and bundle["persistentVolumeClaim"]["readOnly"] is True
    assert {"configMapRef": {"name": "unimatch-config"}} in c["envFrom"]
    token = next(e for e in c["env"] if e["name"] == "UNIMATCH_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "unimatch-secrets"
    assert c["image"].startswith("registry.example.com/unimatch/")
    gpu = "nvidia.com/gpu" in c["resources"]["limits"]
    assert gpu == (name == "overlays/gpu")
    if gpu:
        assert c["image"].split("/")[-1].startswith("gpu:")
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nodeSelector" not in pod and "tolerations" not in pod


@pytest.mark.parametrize("name", ["overlays/cpu", "overlays/gpu"])
def test_selectors_and_autoscaling_wiring(name: str) -> None:
    objs = by_key(name)
    dep, pod = _serving(name)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = objs[("Service", "unimatch")]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in pod["containers"][0]["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    pdb = objs[("PodDisruptionBudget", "unimatch")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = objs[("HorizontalPodAutoscaler", "unimatch")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "unimatch"
    assert "replicas" not in dep["spec"], "the HPA owns the replica count: `replicas` would reset it on every apply"
    assert hpa["spec"]["minReplicas"] >= 2, "one replica makes a node drain an outage"
    assert objs[("PodDisruptionBudget", "unimatch")]["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    pods_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert "unimatch_request_duration_seconds_p99" in pods_metrics
    if name == "overlays/gpu":
        # a GPU replica's CPU use says little about its load: no CPU metric, requests in flight instead
        assert resources == [] and "unimatch_in_flight_requests" in pods_metrics
    else:
        assert resources == ["cpu"]
    cm = objs[("ConfigMap", "unimatch-config")]
    assert all(k.startswith("UNIMATCH_") for k in cm["data"])
    assert "UNIMATCH_REDIS_URL" not in cm["data"], "the URL holds the password: it is built from the Secret in `env`"
    env = [e["name"] for e in pod["containers"][0]["env"]]
    url = next(e["value"] for e in pod["containers"][0]["env"] if e["name"] == "UNIMATCH_REDIS_URL")
    assert url == "redis://:$(REDIS_PASSWORD)@unimatch-redis:6379/0"
    assert env.index("REDIS_PASSWORD") < env.index("UNIMATCH_REDIS_URL"), "$(VAR) expands only earlier variables"
    assert ("StatefulSet", "unimatch-redis") in objs and ("Service", "unimatch-redis") in objs
    assert all(o["metadata"].get("namespace") == "unimatch" for k, o in objs.items() if k[0] != "Namespace")


def _secret_refs(obj: dict[str, Any]) -> set[tuple[str, str]]:
    refs = set()
    for ps in kustomize_lite.pod_specs(obj):
        for c in ps.get("initContainers", []) + ps["containers"]:
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    refs.add((ref["name"], ref["key"]))
            assert not any("secretRef" in src for src in c.get("envFrom", [])), "name the keys one by one"
    return refs


def test_no_secret_in_any_kustomization_and_the_documented_one_covers_every_reference() -> None:
    """`kubectl apply` after `kubectl create secret` must not put a value from git back."""
    refs: set[tuple[str, str]] = set()
    for name in KUSTOMIZATIONS:
        objs = rendered(name)
        assert not [o for o in objs if o["kind"] == "Secret"], f"{name} renders a Secret"
        for obj in objs:
            refs |= _secret_refs(obj)
    assert {name for name, _ in refs} == {"unimatch-secrets"}
    assert {key for _, key in refs} == SECRET_KEYS
    docs = (ROOT / "docs/deploy.md").read_text().replace("\\\n", " ")
    create = next(line for line in docs.splitlines() if "create secret generic unimatch-secrets" in line)
    for key in SECRET_KEYS:
        assert f"--from-literal={key}=" in create, f"docs/deploy.md's `kubectl create secret` lacks {key}"


def test_redis_has_maxmemory_a_policy_and_the_secret_password() -> None:
    objs = by_key("overlays/cpu")
    (c,) = objs[("StatefulSet", "unimatch-redis")]["spec"]["template"]["spec"]["containers"]
    script = c["args"][0]
    assert "--maxmemory " in script and "--maxmemory-policy " in script
    assert "requirepass $REDIS_PASSWORD" in script and "--requirepass" not in script, "password via stdin, not argv"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"]}
    assert env == {"REDIS_PASSWORD": "REDIS_PASSWORD", "REDISCLI_AUTH": "REDIS_PASSWORD"}
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and int(script.split("--maxmemory ")[1].split("mb")[0]) < int(limit[:-2]) * 1024


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_command_starts_a_redis_that_wants_the_password(tmp_path: Path) -> None:
    """The StatefulSet's own script, run with a real redis-server on a free port."""
    import socket
    import time

    import redis

    (c,) = by_key("overlays/cpu")[("StatefulSet", "unimatch-redis")]["spec"]["template"]["spec"]["containers"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = c["args"][0].replace("redis-server ", f"redis-server --port {port} --bind 127.0.0.1 --dir {tmp_path} ", 1)
    proc = subprocess.Popen(["/bin/sh", "-ec", script], env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": "0123abcd"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        good = redis.Redis(port=port, password="0123abcd", socket_timeout=2)
        for _ in range(100):
            try:
                good.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        assert good.config_get("maxmemory")["maxmemory"] == str(2560 * 1024 * 1024)
        assert good.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_network_policies_let_only_the_service_and_the_loader_reach_redis() -> None:
    objs = by_key("overlays/cpu")
    dep, pod = _serving("overlays/cpu")
    serving_labels = dep["spec"]["template"]["metadata"]["labels"]
    serving = objs[("NetworkPolicy", "unimatch")]["spec"]
    assert serving["podSelector"]["matchLabels"].items() <= serving_labels.items()
    assert [p["port"] for rule in serving["ingress"] for p in rule["ports"]] == ["http"]
    assert {p["port"] for rule in serving["egress"] for p in rule["ports"]} == {6379, 53}
    red = objs[("NetworkPolicy", "unimatch-redis")]["spec"]
    redis_labels = objs[("StatefulSet", "unimatch-redis")]["spec"]["template"]["metadata"]["labels"]
    assert red["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert red["egress"] == [] and set(red["policyTypes"]) == {"Ingress", "Egress"}
    allowed = [peer["podSelector"]["matchLabels"] for rule in red["ingress"] for peer in rule["from"]]
    loader = next(o for o in rendered("jobs") if o["metadata"]["name"] == "unimatch-features-load")
    for labels in (serving_labels, loader["spec"]["template"]["metadata"]["labels"]):
        assert any(sel.items() <= labels.items() for sel in allowed), labels
    index_build = next(o for o in rendered("jobs") if o["metadata"]["name"] == "unimatch-index-build")
    assert not any(sel.items() <= index_build["spec"]["template"]["metadata"]["labels"].items() for sel in allowed)
    # every pod of the serving stack and the Jobs is selected by some policy (checkov CKV2_K8S_6)
    for name in ("overlays/cpu", "jobs"):
        objs_n = rendered(name)
        policies = [o["spec"]["podSelector"]["matchLabels"] for o in objs_n if o["kind"] == "NetworkPolicy"]
        for obj in objs_n:
            if "template" in obj.get("spec", {}):
                labels = obj["spec"]["template"]["metadata"]["labels"]
                assert any(p.items() <= labels.items() for p in policies), f"{obj['metadata']['name']} has no NetworkPolicy"
    jobs = {o["metadata"]["name"]: o["spec"] for o in rendered("jobs") if o["kind"] == "NetworkPolicy"}
    assert jobs["unimatch-index-build"]["egress"] == [] and jobs["unimatch-index-build"]["ingress"] == []
    assert {p["port"] for r in jobs["unimatch-features-load"]["egress"] for p in r["ports"]} == {6379, 53}


def test_pytorchjob_runs_unimatch_train_under_torchrun() -> None:
    job = by_key("training")[("PyTorchJob", "unimatch-train")]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for replica in specs.values():
        (c,) = replica["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"
        args = torchrun_argv(c)
        i = args.index("--no-python")
        assert args[i + 1] == "unimatch" and args[i + 2] == "train"
        # one run directory per job, named by the operator's job-name label
        assert args[args.index("--out") + 1] == "$RUN"
        assert 'RUN="/data/runs/$JOB_NAME"' in c["args"][0]
        job_name = next(e for e in c["env"] if e["name"] == "JOB_NAME")
        assert job_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['training.kubeflow.org/job-name']"


def test_container_commands_parse_with_the_cli() -> None:
    """The `unimatch ...` command lines of the Deployment, the Jobs and the PyTorchJob exist in the CLI."""
    env = {"UNIMATCH_BUNDLE": "/bundles/current", "UNIMATCH_REDIS_URL": "redis://unimatch-redis:6379/0"}
    argvs = []
    _, pod = _serving("overlays/cpu")
    argvs.append(["serve", *[a.replace("$(UNIMATCH_BUNDLE)", env["UNIMATCH_BUNDLE"]) for a in pod["containers"][0]["args"]]])
    for obj in rendered("jobs"):
        for ps in kustomize_lite.pod_specs(obj):
            for c in ps.get("initContainers", []) + ps["containers"]:
                if c.get("command", [None])[0] == "/bin/sh":
                    argvs += [a for line in c["args"][0].splitlines() if (a := unimatch_argv(line.strip(), env))]
                else:
                    argvs.append([a.replace("$(UNIMATCH_REDIS_URL)", env["UNIMATCH_REDIS_URL"]) for a in c["args"]])
    train_args = torchrun_argv(rendered("training")[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0])
    argvs.append(train_args[train_args.index("--no-python") + 2 :])
    assert sorted(a[0] for a in argvs) == ["export", "features", "index", "serve", "train"]
    assert not any("--redis-url" in a for a in argvs), "the URL carries the password: pass it in the environment"
    check_cli_argv(argvs)


def test_service_settings_names_exist() -> None:
    """Every UNIMATCH_* variable the serving containers get is a field of service.config.Settings."""
    import re

    from service.config import Settings

    known = {f"UNIMATCH_{name.upper()}" for name in Settings.model_fields}
    names: set[str] = set()
    for overlay in ("overlays/cpu", "overlays/gpu"):
        objs = by_key(overlay)
        names |= set(objs[("ConfigMap", "unimatch-config")]["data"])
        _, pod = _serving(overlay)
        names |= {e["name"] for e in pod["containers"][0]["env"] if e["name"].startswith("UNIMATCH_")}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    names |= set(compose["services"]["unimatch"]["environment"])
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in dockerfile.splitlines():
        if line.startswith("ENV "):
            names |= set(re.findall(r"\b(UNIMATCH_[A-Z_]+)=", line))
    assert {"UNIMATCH_BUNDLE", "UNIMATCH_REDIS_URL", "UNIMATCH_ADMIN_TOKEN", "UNIMATCH_PROVIDERS"} <= names
    assert names <= known, f"not service settings: {sorted(names - known)}"
