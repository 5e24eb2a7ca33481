"""Open a serving bundle (docs/bundle-format.md, format version 1): manifest, schema, mmapped arrays.

The bundle is what `unimatch export` and `unimatch index build` write and every service replica
memory-maps read-only (paper section IV-B/C: the deep model and its 4-layer HNSW graph served as
"user in, top-k ads out"). Loading validates everything a request would otherwise trip over later —
missing files, checksum mismatches, a schema that is not the one the model was exported with, arrays
whose shapes disagree with the manifest — and reports it as a one-line ``BundleError``.

numpy + json only: no onnxruntime, no torch. The ONNX sessions are opened by ``service.scoring``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.calibration import Calibration, CalibrationError, graph_fingerprint, load_calibration
from contracts.checks import check_containment, onnx_files_of
from contracts.checks import verify_checksums as _verify_checksums
from contracts.graph import Graph, load_graph
from contracts.manifest import BundleError, read_manifest
from contracts.schema import FeatureSchema, SchemaError

REQUIRED_FILES = ("manifest.json", "schema.json", "user_encoder.onnx", "pair_scorer.onnx")


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle. Arrays are read-only memory maps: replicas share the page cache."""

    path: Path
    manifest: dict[str, Any]
    schema: FeatureSchema
    version: str
    entity_ids: np.ndarray  # (E,) str
    entity_type: np.ndarray  # (E,) int16
    domain_mask: np.ndarray  # (E,) uint64
    entity_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (E, ...) float32
    vectors: np.ndarray | None = None  # (E, D) float32, the L2 space of the graph
    graph: Graph | None = None
    # Search calibration (`unimatch index calibrate`); None when absent or measured on another graph,
    # with the reason in ``calibration_note``.
    calibration: Calibration | None = None
    calibration_note: str = "not calibrated (run `unimatch index calibrate`)"
    # Lazily built id -> row map; a lock so that concurrent first calls build it once.
    _row_index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def num_entities(self) -> int:
        return int(self.entity_ids.shape[0])

    @property
    def has_graph(self) -> bool:
        return self.graph is not None

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "deep"))

    def row_of(self, entity_id: str) -> int | None:
        """External entity id -> row, or None when the id is not in the catalogue."""
        index = self._row_index.get("ids")
        if index is None:
            with self._lock:
                index = self._row_index.get("ids")
                if index is None:
                    index = {str(e): i for i, e in enumerate(self.entity_ids.tolist())}
                    self._row_index["ids"] = index
        return index.get(entity_id)


def _load_npy(path: Path, rel: str) -> np.ndarray:
    if not path.is_file():
        raise BundleError(f"{path.parent.parent if rel.count('/') else path.parent}: {rel} missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"{path}: cannot load ({exc})") from None


def load_bundle(path: Path, *, verify_checksums: bool = True) -> Bundle:
    """Open and validate the bundle at ``path``; raises ``BundleError`` with a one-line reason."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory (run `unimatch export`)")
    for rel in REQUIRED_FILES:
        if not (root / rel).is_file():
            raise BundleError(f"{root}: {rel} missing")
    manifest = read_manifest(root)
    try:
        schema = FeatureSchema.load(root / "schema.json")
    except SchemaError as exc:
        raise BundleError(str(exc)) from None
    if manifest.get("schema_fingerprint") != schema.fingerprint():
        raise BundleError(f"{root}: schema.json does not match the schema the bundle was exported with")
    if list(manifest.get("domains", schema.domains)) != list(schema.domains):
        raise BundleError(f"{root}: manifest domains {manifest.get('domains')} differ from schema.json")
    listed: dict[str, Any] = dict(manifest.get("files", {}))
    if "graph" in manifest:
        listed.update(manifest["graph"].get("files", {}))
    cal_meta = manifest.get("calibration") if "graph" in manifest else None
    if cal_meta:
        listed[str(cal_meta.get("file", "calibration.json"))] = {"sha256": cal_meta.get("sha256")}
    # every path stays inside the bundle (contracts/checks.py), checked before any file is opened
    if verify_checksums:  # first: "checksum mismatch" is the clearest word for a truncated file
        _verify_checksums(root, listed)
    check_containment(root, manifest, onnx_files_of(manifest, ("user_encoder.onnx", "pair_scorer.onnx")))
    ids = _load_npy(root / "entities/external_id.npy", "entities/external_id.npy")
    etype = _load_npy(root / "entities/entity_type.npy", "entities/entity_type.npy")
    dmask = _load_npy(root / "entities/domain_mask.npy", "entities/domain_mask.npy")
    n = int(ids.shape[0])
    if manifest.get("num_entities", n) != n:
        raise BundleError(f"{root}: manifest says {manifest.get('num_entities')} entities, external_id.npy has {n}")
    if etype.shape != (n,) or etype.dtype != np.int16:
        raise BundleError(f"{root}: entities/entity_type.npy must be ({n},) int16, got {etype.shape} {etype.dtype}")
    if dmask.shape != (n,) or dmask.dtype != np.uint64:
        raise BundleError(f"{root}: entities/domain_mask.npy must be ({n},) uint64, got {dmask.shape} {dmask.dtype}")
    tensors: dict[str, np.ndarray] = {}
    for name, meta in manifest.get("entity_tensors", {}).items():
        rel = meta.get("file", f"entities/{name}.npy")
        arr = _load_npy(root / rel, rel)
        if arr.shape[0] != n or list(arr.shape) != list(meta.get("shape", arr.shape)):
            raise BundleError(f"{root}: {rel} has shape {arr.shape}, manifest says {meta.get('shape')}")
        tensors[name] = arr
    vectors = None
    vs = manifest.get("vector_space")
    if vs:
        vectors = _load_npy(root / vs["file"], vs["file"])
        if vectors.shape[0] != n:
            raise BundleError(f"{root}: {vs['file']} has {vectors.shape[0]} rows, expected {n}")
    graph = load_graph(root, manifest=manifest) if "graph" in manifest else None  # checksums were verified above
    calibration, note = _load_calibration(root, manifest, cal_meta)
    return Bundle(
        path=root,
        manifest=manifest,
        schema=schema,
        version=str(manifest.get("bundle_version", "unknown")),
        entity_ids=ids,
        entity_type=etype,
        domain_mask=dmask,
        entity_tensors=tensors,
        vectors=vectors,
        graph=graph,
        calibration=calibration,
        calibration_note=note,
    )


def _load_calibration(root: Path, manifest: dict[str, Any], meta: dict[str, Any] | None) -> tuple[Calibration | None, str]:
    """The calibration the manifest names, unless it was measured on another graph (then: why not)."""
    if not meta:
        return None, "not calibrated (run `unimatch index calibrate`)"
    rel = str(meta.get("file", "calibration.json"))
    try:
        cal = load_calibration(root / rel)
    except CalibrationError as exc:
        raise BundleError(f"{root}: {exc}") from None
    if cal.graph != graph_fingerprint(manifest):
        return None, "calibration ignored: it was measured on another graph (rerun `unimatch index calibrate`)"
    return cal, f"calibrated {cal.created_at} on {cal.queries} {cal.split} queries, target coverage {cal.target}"
