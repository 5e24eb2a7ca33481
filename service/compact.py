"""Compaction: fold a bundle's change log into a new bundle version (`unimatch index compact`).

The live catalogue (``service.live``) keeps every online change in memory above the bundle: appended
rows, a live mask, the graph overlay. Compaction replays the bundle lineage's log (``service.changes``)
with the very code the service applies it with, and writes what results as an ordinary bundle
(docs/bundle-format.md):

* rows stay where they are: the base rows first (user histories in the feature store name them), then
  the rows added online, in log order; a superseded or deleted row stays as a node of the graph, its
  state in ``entities/status.npy`` (0 live, 1 paused, 2 dead), so it is never returned;
* the graph is the overlay frozen into CSR (base lists, the overlay's edited lists and its new nodes'
  lists), validated like any graph; no rebuild, so the compacted version searches exactly the graph
  the service was serving;
* ``manifest.live`` records the lineage, the log position folded in and the rows the feature store
  was loaded for: a worker serving the new version replays only the entries after that position, so
  its overlay starts empty and holds only what came since.

The calibration is dropped (it was measured on the old graph; rerun `unimatch index calibrate`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from contracts.io import atomic_directory, atomic_write_json, check_output_dir, sha256_file


def compact(*, bundle: Path, out: Path, redis_url: str, prefix: str = "unimatch", until: str | None = None,
            force: bool = False) -> dict[str, Any]:
    """Replay the lineage's log (up to ``until``, default its end) onto ``bundle``; write the result to ``out``.

    ``out`` must be missing or empty; a bundle of ours there is replaced only with ``force``, anything
    else never (``contracts.io.check_output_dir``): refused before any work."""
    from contracts.bundle import load_bundle
    from contracts.graph import Graph, validate_graph, write_graph_arrays
    from service.changes import ChangeFollower, ChangeLog, stream_key
    from service.live import LiveCatalogue

    base = load_bundle(Path(bundle))
    if Path(out).resolve() == base.path.resolve():
        raise ValueError(f"{out}: compaction writes a new bundle version; serving replicas map {bundle} (choose another --out)")
    check_output_dir(Path(out), marker="manifest.json", force=force)
    schema = base.schema
    lineage = str((base.manifest.get("live") or {}).get("lineage", base.version))
    changes = ChangeLog.from_url(redis_url, stream_key(prefix + ":", lineage))
    after = str((base.manifest.get("live") or {}).get("position", "0-0"))
    end = until or changes.last_position()
    # capacity: every upserted entity of the log after the bundle's position, up to ``end``
    upserts, pos = 0, after
    while True:
        entries = changes.range_after(pos, until=end, count=2000)
        if not entries:
            break
        upserts += sum(len(c.get("entities", [])) for _, c in entries if c.get("op") == "upsert")
        pos = entries[-1][0]
    counts = np.zeros((schema.num_domains, schema.num_entity_types), dtype=np.int64)
    live = LiveCatalogue(base, capacity=max(1, upserts), type_counts=counts)
    follower = ChangeFollower(changes, live)
    if end != "0-0":
        follower.catch_up(end)
    n = live.E + live.count
    E0 = live.E
    ov = live.overlay
    with atomic_directory(Path(out), marker="manifest.json") as tmp:
        (tmp / "entities").mkdir()
        manifest = json.loads(json.dumps(base.manifest))
        arrays: dict[str, np.ndarray] = {
            "entities/external_id.npy": np.concatenate([np.asarray(base.entity_ids).astype(str), np.asarray(live.ids, dtype=str)]),
            "entities/entity_type.npy": np.asarray(live.entity_type[:n], dtype=np.int16),
            "entities/domain_mask.npy": np.asarray(live.domain_mask[:n], dtype=np.uint64),
            "entities/status.npy": live.status(),
        }
        for name, meta in manifest.get("entity_tensors", {}).items():
            arrays[meta["file"]] = np.concatenate([np.asarray(base.entity_tensors[name]), live.tables[name][: live.count]])
            meta["shape"] = list(arrays[meta["file"]].shape)
        enc = manifest.get("entity_encoder") or {}
        if enc.get("id_embedding") and enc["id_embedding"] not in arrays:
            arrays[enc["id_embedding"]] = np.concatenate([live.encoder.id_embedding, live.aid[: live.count]])
        if base.vectors is not None:
            vs = manifest["vector_space"]["file"]
            extra = ov.vectors_of(np.arange(E0, n)) if ov is not None else np.zeros((0, base.vectors.shape[1]), np.float32)
            arrays[vs] = np.concatenate([np.asarray(base.vectors), extra]).astype(np.float32)
        for rel, arr in arrays.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp / rel, np.ascontiguousarray(arr), allow_pickle=False)
        for rel in manifest.get("files", {}):  # everything else is the base bundle's, unchanged
            if rel not in arrays:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(base.path / rel, tmp / rel)
        files = {rel: {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
                 for rel in [*manifest.get("files", {}), *arrays]}
        manifest["files"] = files
        manifest["num_entities"] = n
        manifest.pop("calibration", None)
        if ov is not None and base.graph is not None:
            graph = Graph(
                levels=np.concatenate([np.asarray(base.graph.levels), ov.levels[: live.count]]).astype(np.int8),
                offsets=tuple(ov.frozen_layer(layer)[0] for layer in range(ov.layers)),
                neighbors=tuple(ov.frozen_layer(layer)[1] for layer in range(ov.layers)),
                entry_points=np.asarray(base.graph.entry_points, dtype=np.int32),
            )
            validate_graph(graph)
            gfiles = write_graph_arrays(graph, tmp / "graph")
            health = {"layers": ov.layers, "nodes_per_layer": [int((graph.levels >= lv).sum()) for lv in range(ov.layers)],
                      "compacted_from": base.version, "online_insertions": live.count,
                      "note": "graph frozen from the live overlay, not rebuilt: the L2 recall check was not rerun"}
            atomic_write_json(tmp / "graph_health.json", health)
            gfiles["graph_health.json"] = {"sha256": sha256_file(tmp / "graph_health.json"),
                                           "bytes": (tmp / "graph_health.json").stat().st_size}
            manifest["graph"]["files"] = gfiles
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode())
        manifest["bundle_version"] = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{digest.hexdigest()[:8]}"
        manifest["created"] = now.isoformat().replace("+00:00", "Z")
        manifest["live"] = {
            "lineage": lineage,
            "position": live.position,
            "applied": live.applied + int((base.manifest.get("live") or {}).get("applied", 0)),
            "status": "entities/status.npy",
            "feature_rows": int((base.manifest.get("live") or {}).get("feature_rows", E0)),
            "compacted_from": base.version,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    return {"bundle_version": manifest["bundle_version"], "lineage": lineage, "position": live.position,
            "entries": live.applied, "rows_added": live.count, "num_entities": n,
            "paused": len(live.paused), "dead": int((arrays["entities/status.npy"] == 2).sum())}
