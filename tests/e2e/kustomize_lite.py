"""A small offline Kustomize renderer for the tests, covering exactly the features k8s/ uses.

CI machines may lack `kubectl`/`kustomize`; this renders ``resources`` (files and directories),
``namespace``, ``labels`` (metadata only, ``includeSelectors: false``), ``images`` and strategic-merge
``patches`` (lists of objects merged by ``name``, other lists replaced). Where kubectl exists the tests
check that it renders the same objects as ``kubectl kustomize``. Unsupported keys raise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def render(directory: Path) -> list[dict[str, Any]]:
    """All objects of the kustomization in ``directory``, transformations applied."""
    kfile = directory / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{kfile}: kustomize_lite does not support {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for res in spec.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{kfile}: only file patches are supported, got {patch}")
        doc = yaml.safe_load((directory / patch["path"]).read_text())
        target = [o for o in objects if o["kind"] == doc["kind"] and o["metadata"]["name"] == doc["metadata"]["name"]]
        if len(target) != 1:
            raise ValueError(f"{patch['path']}: patch matches {len(target)} objects")
        merged = _merge(target[0], doc)
        objects[objects.index(target[0])] = merged
    for image in spec.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, _tag = container["image"].partition(":")
                if container["image"] == image["name"] or name == image["name"]:
                    new_name = image.get("newName", name)
                    new_tag = image.get("newTag", _tag)
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
    for label in spec.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise ValueError("kustomize_lite: labels with includeSelectors/includeTemplates are not supported")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = spec["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge: maps recursively, lists of named maps by `name`, any other list replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        items = copy.deepcopy(base)
        by_name = {x["name"]: i for i, x in enumerate(items)}
        new = []  # like kustomize: items only the patch has go first, in patch order
        for item in patch:
            if item["name"] in by_name:
                items[by_name[item["name"]]] = _merge(items[by_name[item["name"]]], item)
            else:
                new.append(copy.deepcopy(item))
        return new + items
    return copy.deepcopy(patch)


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod specs inside a workload (Deployment, StatefulSet, Job, PyTorchJob replica specs)."""
    spec = obj.get("spec", {})
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for ps in pod_specs(obj) for c in ps.get("containers", []) + ps.get("initContainers", [])]


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]
