"""Containment checks of a bundle: every file it names stays inside its directory (docs/bundle-format.md).

A bundle is data the service memory-maps and hands to onnxruntime, so a manifest entry such as
``../../etc/x.npy`` or ``/data/other/vectors.npy``, a symlink that points out of the bundle, or an ONNX
initializer whose external data lives elsewhere would make a replica read files nobody shipped with
the bundle (an earlier release followed such paths). These checks refuse that with a one-line reason.

stdlib only (no onnx package on the serving side): ONNX external-data locations are read with a
minimal protobuf wire-format walk over the fields of onnx.proto that can hold a TensorProto.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from contracts.io import sha256_file
from contracts.manifest import BundleError


# ---- manifest paths ------------------------------------------------------------------------------
def manifest_paths(manifest: dict[str, Any]) -> list[str]:
    """Every bundle-relative path a manifest names: keys of any ``files`` map, values of ``file``/``*_file``."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "files" and isinstance(value, dict):
                    found.extend(str(k) for k in value)
                    for meta in value.values():
                        walk(meta)
                elif (key == "file" or key.endswith("_file")) and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(manifest)
    return found


def check_inside(root: Path, rel: str, *, what: str = "manifest.json names") -> Path:
    """``root/rel`` if ``rel`` is a plain relative path that resolves (links followed) inside ``root``."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or Path(rel).is_absolute() or ".." in pure.parts or "\\" in rel:
        raise BundleError(f"{root}: {what} {rel!r}: only plain paths inside the bundle are allowed")
    path = root / rel
    real_root = root.resolve()
    resolved = path.resolve()
    if resolved != real_root and real_root not in resolved.parents:
        raise BundleError(f"{root}: {what} {rel!r}, which resolves outside the bundle ({resolved})")
    return path


def check_no_link_out(root: Path) -> None:
    """No symlink anywhere under ``root`` may point outside it (the walk does not follow links)."""
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                target = path.resolve()
                if target != real_root and real_root not in target.parents:
                    raise BundleError(f"{root}: {path.relative_to(root)} is a symlink out of the bundle ({target})")


def check_containment(root: Path, manifest: dict[str, Any], onnx_files: list[str]) -> None:
    """All of the above, plus the external-data locations of each ONNX file in ``onnx_files``."""
    check_no_link_out(root)
    for rel in manifest_paths(manifest):
        check_inside(root, rel)
    for rel in onnx_files:
        path = check_inside(root, rel, what="ONNX file")
        if not path.is_file():
            continue  # absence is reported by the caller, with the file's role
        for location in onnx_external_locations(path):
            if PurePosixPath(location).is_absolute() or Path(location).is_absolute():
                raise BundleError(f"{root}: {rel}: external data {location!r} is an absolute path")
            # onnxruntime reads a location relative to the model file's directory
            check_inside(root, str(PurePosixPath(rel).parent / location), what=f"{rel}: external data")


# ---- ONNX external data (protobuf wire format) -------------------------------------------------
# Field numbers from onnx/onnx.proto: where a TensorProto (and so external data) can appear.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BundleError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """(field number, payload) of each field; payload only for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield field, None
        elif wire == 1:
            pos += 8
            yield field, None
        elif wire == 5:
            pos += 4
            yield field, None
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise BundleError("truncated field")
            yield field, buf[pos : pos + size]
            pos += size
        else:
            raise BundleError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise BundleError("truncated field")


def _tensor(buf: memoryview, out: list[str]) -> None:
    for field, payload in _fields(buf):
        if field == _TENSOR_EXTERNAL_DATA and payload is not None:
            key = value = ""
            for f, p in _fields(payload):
                if p is not None and f == _ENTRY_KEY:
                    key = bytes(p).decode("utf-8", "replace")
                elif p is not None and f == _ENTRY_VALUE:
                    value = bytes(p).decode("utf-8", "replace")
            if key == "location":
                out.append(value)


def _sparse(buf: memoryview, out: list[str]) -> None:
    for field, payload in _fields(buf):
        if payload is not None and field in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(payload, out)


def _node(buf: memoryview, out: list[str]) -> None:
    for field, payload in _fields(buf):
        if payload is None or field != _NODE_ATTRIBUTE:
            continue
        for f, p in _fields(payload):
            if p is None:
                continue
            if f in (_ATTR_TENSOR, _ATTR_TENSORS):
                _tensor(p, out)
            elif f in (_ATTR_GRAPH, _ATTR_GRAPHS):
                _graph(p, out)
            elif f in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(p, out)


def _graph(buf: memoryview, out: list[str]) -> None:
    for field, payload in _fields(buf):
        if payload is None:
            continue
        if field == _GRAPH_NODE:
            _node(payload, out)
        elif field == _GRAPH_INITIALIZER:
            _tensor(payload, out)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            _sparse(payload, out)


def onnx_external_locations(path: Path) -> list[str]:
    """The ``location`` of every external-data tensor in the ONNX model at ``path`` (usually none).

    Raises:
        BundleError: the file is not a parseable ONNX protobuf (e.g. truncated).
    """
    buf = memoryview(Path(path).read_bytes())
    out: list[str] = []
    try:
        fields = list(_fields(buf))
        if not any(field == _MODEL_GRAPH for field, _ in fields):
            raise BundleError("no graph")
        for field, payload in fields:
            if payload is None:
                continue
            if field == _MODEL_GRAPH:
                _graph(payload, out)
            elif field == _MODEL_FUNCTIONS:
                for f, p in _fields(payload):
                    if p is not None and f == _FUNCTION_NODE:
                        _node(p, out)
    except BundleError as exc:
        raise BundleError(f"{path}: not a readable ONNX model ({exc}; truncated or corrupted?)") from None
    return out


# ---- checksums -----------------------------------------------------------------------------------
def verify_checksums(root: Path, listed: dict[str, Any]) -> None:
    """Each listed file exists and, where the manifest records one, has that sha256 (reads every byte)."""
    for rel, meta in listed.items():
        path = check_inside(root, rel)
        if not path.is_file():
            raise BundleError(f"{root}: {rel} missing (listed in manifest.json)")
        expected = meta.get("sha256") if isinstance(meta, dict) else None
        if not expected:
            continue
        if sha256_file(path) != expected:
            size = path.stat().st_size
            recorded = meta.get("bytes")
            hint = f" ({size} bytes, manifest says {recorded})" if isinstance(recorded, int) and recorded != size else ""
            raise BundleError(f"{root}: {rel} checksum mismatch{hint} (file changed, truncated or corrupted)")


def onnx_files_of(manifest: dict[str, Any], required: tuple[str, ...] = ()) -> list[str]:
    """The ONNX models of a bundle: the required ones and any other listed ``*.onnx``."""
    names = list(required) + [rel for rel in manifest_paths(manifest) if rel.endswith(".onnx")]
    return list(dict.fromkeys(names))
