"""Up-front checks of the bundle and dataset a load run is given: one clear error before any work.

Both load runners start things (a service, Redis, Locust, a private temp directory) before they
touch the bundle or the dataset themselves; a bad path or a broken bundle found then is a service
that "did not start" (with its log in a directory about to be removed) or a stack of frames. Checked
here first, a bad input is one line and exit 2, like every other command.
"""

from __future__ import annotations

from pathlib import Path


def check_bundle_and_data(bundle: Path, data: Path, *, require_graph: bool = False, verify_checksums: bool = True) -> None:
    """Raise ValueError (one line) unless ``bundle`` loads (manifest, checksums, graph) and ``data`` is
    a dataset with the bundle's schema and entity count."""
    from contracts.bundle import load_bundle
    from contracts.dataset import load_dataset

    b = load_bundle(bundle, verify_checksums=verify_checksums)  # BundleError: a ValueError with the reason
    if require_graph and b.graph is None:
        raise ValueError(f"{bundle}: the bundle has no graph (run `unimatch index build --bundle {bundle}`)")
    ds = load_dataset(data)  # DatasetError: a ValueError
    if ds.schema.fingerprint() != b.schema.fingerprint():
        raise ValueError(f"{data}: dataset schema differs from the bundle's ({bundle})")
    if len(ds.entities) != b.num_entities:
        raise ValueError(f"{data}: {len(ds.entities):,} entities, the bundle has {b.num_entities:,}")
