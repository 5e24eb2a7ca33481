"""Pinned outputs of the dataset writers: ``generate`` (synthetic tiny) and ``import_mapping`` (both examples).

The digests were computed on the code before ``generate`` and ``import_mapping`` were split into one
step per table, so they check that the split changed no byte of what either writes. The digest covers
the sha256 of every array file, the schema fingerprint, the counts, and the manifest entries that are
not paths (the generator's settings; the split policy, encodings, eligibility, positive filter and time
note of an import).

A digest also moves when numpy changes a random stream or its LAPACK (the synthetic users' domain
rotations come from a QR): if one fails right after a numpy upgrade and nothing in model/data changed,
re-derive it with that numpy; otherwise the change in model/data altered the data and is a bug.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from model.data.mapping import import_mapping
from model.data.synth import generate, preset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IMPORT_META = ("split_policy", "encodings", "eligibility", "positive", "time")


def dataset_digest(ds: Path, meta_keys: tuple[str, ...]) -> str:
    """sha256 over the array files' checksums, schema fingerprint, counts and the named manifest keys."""
    manifest: dict[str, Any] = json.loads((ds / "dataset.json").read_text())
    payload = {
        "files": {rel: entry["sha256"] for rel, entry in sorted(manifest["files"].items())},
        "schema": manifest["schema_fingerprint"],
        "counts": manifest["counts"],
        **{k: manifest.get(k) for k in meta_keys},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (0, "4cb19b16ac06568b6e55da154d230fbdc6c3ff17436b4eefc0eb31b2e94995dd"),
        (3, "edcaea2f81fac86da27fa53adfa4f15b09a43daabd4bd4e1b90aa42aadd6593e"),
    ],
)
def test_synth_tiny_output_is_pinned(tmp_path: Path, seed: int, expected: str) -> None:
    out = generate(preset("tiny", seed=seed), tmp_path / "tiny")
    assert dataset_digest(out, ("generator", "num_clusters")) == expected


def test_byo_example_import_is_pinned(tmp_path: Path) -> None:
    out = import_mapping(EXAMPLES / "byo" / "mapping.json", tmp_path / "byo")
    assert dataset_digest(out, IMPORT_META) == "730d755ed015ba9c9c0526f56773439240704185d7c004eead2dd18de092c609"


def test_impressions_example_import_is_pinned(tmp_path: Path) -> None:
    """Header-less TSV, positive filter, time features, a multi-value column, per-domain eligibility."""
    example = EXAMPLES / "impressions"
    sys.path.insert(0, str(example))
    try:
        import make_example  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(example))
    src = make_example.main(tmp_path / "src")
    shutil.copy(example / "mapping.json", src / "mapping.json")
    out = import_mapping(src / "mapping.json", tmp_path / "data")
    assert dataset_digest(out, IMPORT_META) == "db903e41b66a93d4e715a2ea333b115ca70e4501cf79f7ad2d14e253d34d012b"
