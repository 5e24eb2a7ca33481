"""The bundle manifest (docs/bundle-format.md, format version 1): one reader, one writer, one error.

``unimatch export`` writes the manifest, ``unimatch index build`` and ``unimatch index calibrate`` add
their sections to it, and every service replica reads it first. All of them go through these three
functions, so the version check, the one-line errors and the atomic, mode-keeping write are the same
everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts.io import atomic_write_json

BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


class BundleError(ValueError):
    """A bundle is missing a file, fails a checksum or a structural check, or disagrees with its manifest.

    The one error of the bundle format: every message is one line that names the file at fault.
    """


def read_manifest(root: Path, *, check_version: bool = True) -> dict[str, Any]:
    """``root/manifest.json`` as a dict; one-line ``BundleError`` when it is absent, not JSON or foreign."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory (run `unimatch export`)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; run `unimatch export` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if check_version and manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format_version {manifest.get('format_version')} is not {BUNDLE_FORMAT_VERSION}")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Replace ``root/manifest.json`` atomically, keeping the file's mode (replicas may run as another user)."""
    path = Path(root) / MANIFEST_FILE
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    atomic_write_json(path, manifest)
    if mode is not None:
        path.chmod(mode)
