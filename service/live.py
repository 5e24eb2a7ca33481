"""The live catalogue of one serving bundle: entities upserted, paused, resumed and deleted online.

Apart from HTTP and from the log (``service.changes``): ``LiveCatalogue.apply`` takes one change of the
ordered change log and makes it visible to the engine of this process.

* **State.** Rows ``0..E-1`` are the bundle's (memory-mapped, never written). An upsert takes the next
  row ``E + i``: its entity tensors and graph vector come from the bundle's entity encoder
  (``entity_encoder.onnx``, paper III-B's entity side: E_a -> ad network -> E_uee, with E_aid), it is
  inserted into the graph overlay (``service.overlay``), and its id now names that row. A changed
  entity (an upsert of a known id) keeps its id embedding, gets a new row, and its old row goes dead.
  A *live mask* over all rows says what may be returned: paused, deleted and superseded rows are off.
* **Determinism.** Every worker applies the same log from the same base in the same order, so rows,
  encodings and overlay edges come out identical (levels are drawn from a generator seeded by the
  bundle version), which is what lets any worker answer for any acknowledged change.
* **Visibility.** A row's tables, type and domains are written before it is linked into the graph, and
  its live bit is set last; a pause clears the bit first. The engine checks the bit where results are
  taken (graph and exhaustive mode), so once ``apply`` returns, a paused entity is never returned.

numpy + onnxruntime; never torch.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from contracts.schema import FeatureSchema, cat_slices
from service.overlay import GraphOverlay

if TYPE_CHECKING:
    from contracts.bundle import Bundle

OPS = ("upsert", "pause", "resume", "delete")
STATUS_LIVE, STATUS_PAUSED, STATUS_DEAD = 0, 1, 2  # entities/status.npy of a compacted bundle


class LiveError(ValueError):
    """A change that cannot be applied to this bundle (no entity encoder, bad features, overlay full)."""


@dataclass(frozen=True)
class EntityRecord:
    """One upserted entity, encoded as the dataset stores entities (docs/data.md)."""

    entity_id: str
    entity_type: int
    domain_mask: int
    cat: np.ndarray  # (Ce,) int64 categorical codes, multi-value columns in consecutive slots
    num: np.ndarray  # (Cn,) float32


@dataclass(frozen=True)
class _EntityLayout:
    """A schema's entity columns, precomputed once: ``parse_entity`` runs for every upserted entity on
    the writer's thread (twice on the acknowledging worker), so it avoids per-call schema walks."""

    types: tuple[str, ...]
    domains: dict[str, int]
    cat: tuple[tuple[str, int, int, int, Any], ...]  # (name, start, values, cardinality, default)
    cat_names: frozenset[str]
    cat_width: int
    num: tuple[tuple[str, float], ...]  # (name, default)
    num_names: frozenset[str]


_LAYOUTS: dict[int, tuple[FeatureSchema, _EntityLayout]] = {}


def _layout(schema: FeatureSchema) -> _EntityLayout:
    got = _LAYOUTS.get(id(schema))
    if got is not None and got[0] is schema:
        return got[1]
    cols = schema.entity_categorical
    lay = _EntityLayout(
        types=tuple(schema.entity_types), domains={d: i for i, d in enumerate(schema.domains)},
        cat=tuple((c.name, sl.start, c.values, c.cardinality, c.default) for c, sl in zip(cols, cat_slices(cols), strict=True)),
        cat_names=frozenset(c.name for c in cols), cat_width=schema.entity_cat_width,
        num=tuple((c.name, float(c.default)) for c in schema.entity_numeric),
        num_names=frozenset(c.name for c in schema.entity_numeric),
    )
    _LAYOUTS[id(schema)] = (schema, lay)  # the schema kept alive with it: its id is never reused
    return lay


def parse_entity(schema: FeatureSchema, item: dict[str, Any]) -> EntityRecord:
    """An upsert item of the change log -> ``EntityRecord``; ``LiveError`` with a one-line reason if invalid.

    ``item``: ``{"entity_id", "entity_type", "domains": [names], "categorical": {name: code | [codes]},
    "numeric": {name: value}}``; absent features take the schema's defaults, as the importers fill them.
    """
    lay = _layout(schema)
    eid = item.get("entity_id")
    if not isinstance(eid, str) or not eid:
        raise LiveError("entity_id must be a non-empty string")
    etype = item.get("entity_type")
    if etype not in lay.types:
        raise LiveError(f"{eid}: unknown entity_type {etype!r}; expected one of {list(lay.types)}")
    domains = item.get("domains") or []
    if not domains or not isinstance(domains, list) or any(not isinstance(d, str) or d not in lay.domains for d in domains):
        raise LiveError(f"{eid}: domains must be a non-empty subset of {list(lay.domains)}, got {domains}")
    mask = 0
    for d in domains:
        mask |= 1 << lay.domains[d]
    cat = [0] * lay.cat_width
    given_cat = item.get("categorical") or {}
    if not isinstance(given_cat, dict):
        raise LiveError(f"{eid}: categorical must be an object of feature name -> code(s)")
    if not lay.cat_names.issuperset(given_cat):
        extra = sorted(set(given_cat) - lay.cat_names)
        raise LiveError(f"{eid}: unknown categorical features {extra}; expected some of {[c[0] for c in lay.cat]}")
    for name, start, values, cardinality, default in lay.cat:
        value = given_cat.get(name, default)
        codes = value if isinstance(value, list) else [value]
        for c in codes:
            if type(c) is not int or not 0 <= c < cardinality:  # bool is not a code
                raise LiveError(f"{eid}: feature {name!r} needs codes in [0, {cardinality}), got {value!r}")
        if len(codes) > values:
            raise LiveError(f"{eid}: feature {name!r} takes at most {values} codes, got {len(codes)}")
        cat[start : start + len(codes)] = codes
    given_num = item.get("numeric") or {}
    if not isinstance(given_num, dict):
        raise LiveError(f"{eid}: numeric must be an object of feature name -> number")
    if not lay.num_names.issuperset(given_num):
        extra = sorted(set(given_num) - lay.num_names)
        raise LiveError(f"{eid}: unknown numeric features {extra}; expected some of {[n for n, _ in lay.num]}")
    values_num = [given_num.get(name, default) for name, default in lay.num]
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in values_num):
        raise LiveError(f"{eid}: numeric features must be finite numbers")
    num = np.array(values_num, dtype=np.float32)
    if not np.isfinite(num).all():  # finite in float64, beyond float32's range
        raise LiveError(f"{eid}: numeric features must be finite numbers")
    return EntityRecord(eid, lay.types.index(etype), mask, np.array(cat, dtype=np.int64), num)


def check_change(schema: FeatureSchema, change: dict[str, Any]) -> list[EntityRecord] | None:
    """Validate a change before it is logged, so that the log only holds changes every worker can apply.

    Returns an upsert's parsed entities (None for the other ops): the acknowledging worker applies its
    own change from them (``LiveCatalogue.apply(..., records=)``) instead of parsing the entry again.
    """
    op = change.get("op")
    if op not in OPS:
        raise LiveError(f"op must be one of {OPS}, got {op!r}")
    if op == "upsert":
        items = change.get("entities")
        if not isinstance(items, list) or not items:
            raise LiveError("an upsert needs a non-empty list of entities")
        records = [parse_entity(schema, item) for item in items]
        if len({r.entity_id for r in records}) != len(records):
            seen: set[str] = set()
            for rec in records:
                if rec.entity_id in seen:
                    raise LiveError(f"{rec.entity_id}: listed twice in one upsert")
                seen.add(rec.entity_id)
        return records
    ids = change.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise LiveError(f"{op} needs a non-empty list of entity ids")
    return None


class EntityEncoder:
    """``entity_encoder.onnx`` of the bundle: features + id embedding -> entity tensors and graph vector."""

    def __init__(self, bundle: Bundle) -> None:
        import onnxruntime as ort

        from service.scoring.host import session_options

        section = bundle.manifest.get("entity_encoder")
        if not section:
            raise LiveError(f"{bundle.path}: the bundle has no entity encoder (export it again with this version)")
        self.session = ort.InferenceSession(str(bundle.path / section["file"]), session_options(1),
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.id_embedding = np.asarray(np.load(bundle.path / section["id_embedding"], mmap_mode="r", allow_pickle=False))
        self.cold = np.load(bundle.path / section["cold_id_embedding"], allow_pickle=False)

    def encode(self, cat: np.ndarray, num: np.ndarray, etype: np.ndarray, aid: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"ent_cat": cat, "ent_num": num, "ent_type": etype, "id_embedding": aid}
        out = self.session.run(self.outputs, {k: v for k, v in feeds.items() if k in self.inputs})
        return dict(zip(self.outputs, out, strict=True))


@dataclass
class ApplyResult:
    position: str
    op: str
    rows: list[int] = field(default_factory=list)  # rows written or switched
    skipped: int = 0  # ids unknown (pause/resume/delete) at apply time


def stream_ms(position: str) -> int:
    """Milliseconds part of a Redis stream id ("<ms>-<seq>")."""
    return int(position.split("-", 1)[0]) if position and position[0].isdigit() else 0


def position_key(position: str) -> tuple[int, int]:
    ms, _, seq = position.partition("-")
    return int(ms or 0), int(seq or 0)


class LiveCatalogue:
    """Mutable rows, live mask and graph overlay above one bundle; one writer, many lock-free readers."""

    def __init__(self, bundle: Bundle, *, capacity: int, type_counts: np.ndarray, ef_construction: int = 64) -> None:
        if capacity <= 0:
            raise LiveError(f"capacity must be positive, got {capacity}")
        self.bundle = bundle
        self.schema = bundle.schema
        self.E = bundle.num_entities
        self.capacity = int(capacity)
        self.encoder = EntityEncoder(bundle)
        total = self.E + self.capacity
        self.tables = {
            name: np.zeros((self.capacity, *arr.shape[1:]), dtype=np.float32) for name, arr in bundle.entity_tensors.items()
        }
        self.aid = np.zeros((self.capacity, self.encoder.id_embedding.shape[1]), dtype=np.float32)
        self.live = np.zeros(total, dtype=bool)
        self.live[: self.E] = True
        self.domain_mask = np.zeros(total, dtype=np.uint64)
        self.domain_mask[: self.E] = np.asarray(bundle.domain_mask)
        self.entity_type = np.zeros(total, dtype=np.int16)
        self.entity_type[: self.E] = np.asarray(bundle.entity_type)
        self.type_counts = type_counts  # (domains, types) eligible live rows: the engine's own array
        self.ids: list[str] = []  # external id of overlay row E + i
        self._row: dict[str, int] = {}  # ids whose row is not the bundle's (-1: deleted)
        self.paused: set[str] = set()
        self.count = 0
        live_meta = dict(bundle.manifest.get("live") or {})
        self.lineage = str(live_meta.get("lineage", bundle.version))
        self.position = str(live_meta.get("position", "0-0"))  # last log entry applied
        self.applied = 0
        self.last_lag_s = 0.0
        # Called before each ``insert_chunk`` entities of a change are inserted (0: the whole change at
        # once, no call): the applier's wait for a moment without requests (service.activity).
        self.yield_to: Callable[[], object] | None = None
        self.insert_chunk = 0
        self.applier_priority: str | None = None  # OS priority the applier thread got (service.changes); None: no thread
        self.encode_s = 0.0  # wall seconds in the entity encoder (a benchmark's split of the writer's time)
        self.lock = threading.Lock()  # the writer's; readers never take it
        graph = bundle.graph
        self.overlay: GraphOverlay | None = None
        if graph is not None:
            g = bundle.manifest.get("graph", {})
            if bundle.vectors is None:
                raise LiveError(f"{bundle.path}: a graph without entities/vectors.npy cannot take insertions")
            seed = int.from_bytes(self.lineage.encode()[-4:].ljust(4, b"\0"), "little")
            self.overlay = GraphOverlay(graph, np.asarray(bundle.vectors), capacity=self.capacity, M=int(g.get("M", 16)),
                                        ef_construction=ef_construction, seed=seed)
        status_file = live_meta.get("status")
        if status_file:  # a compacted bundle: paused and dead rows of the log it folded
            status = np.load(bundle.path / status_file, allow_pickle=False)
            for r in np.flatnonzero(status != STATUS_LIVE).tolist():
                self._set_live(r, False)
            self.paused = {str(bundle.entity_ids[r]) for r in np.flatnonzero(status == STATUS_PAUSED).tolist()}
            for r in np.flatnonzero(status == STATUS_DEAD).tolist():
                eid = str(bundle.entity_ids[r])
                if bundle.row_of(eid) == r:  # the id's last row is dead: deleted (older rows are superseded)
                    self._row[eid] = -1

    # ---- readers --------------------------------------------------------------------------------------
    def row_of(self, entity_id: str) -> int | None:
        """The row an id names now (None: unknown or deleted)."""
        r = self._row.get(entity_id)
        if r is None:
            return self.bundle.row_of(entity_id)
        return r if r >= 0 else None

    def ids_of(self, rows: np.ndarray) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0 or rows.max() < self.E:
            return [str(e) for e in np.asarray(self.bundle.entity_ids[rows]).tolist()]
        return [str(self.bundle.entity_ids[r]) if r < self.E else self.ids[r - self.E] for r in rows.tolist()]

    def gather(self, name: str, base: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows of entity tensor ``name`` over base and overlay rows (the scorer's gather)."""
        over = rows >= self.E
        out = np.empty((rows.size, *base.shape[1:]), dtype=np.float32)
        out[~over] = np.take(base, rows[~over], axis=0)
        out[over] = self.tables[name][rows[over] - self.E]
        return out

    def overlay_rows(self, domain: int) -> np.ndarray:
        """Live overlay rows eligible in ``domain`` (the exhaustive scan's share of the overlay)."""
        n = self.count
        if n == 0:
            return np.empty(0, dtype=np.int64)
        sl = slice(self.E, self.E + n)
        ok = self.live[sl] & ((self.domain_mask[sl] & np.uint64(1 << domain)) != 0)
        return (np.flatnonzero(ok) + self.E).astype(np.int64)

    def info(self) -> dict[str, Any]:
        ov = self.overlay
        return {
            "lineage": self.lineage,
            "position": self.position,
            "applied": self.applied,
            "overlay_rows": self.count,
            "capacity": self.capacity,
            "overridden_lists": ov.overrides if ov is not None else 0,
            "paused": len(self.paused),
            "deleted": sum(1 for r in self._row.values() if r < 0),
            "last_lag_s": round(self.last_lag_s, 4),
            "applier_priority": self.applier_priority,
        }

    # ---- the writer -----------------------------------------------------------------------------------
    def _set_live(self, row: int, on: bool) -> None:
        if bool(self.live[row]) == on:
            return
        mask = int(self.domain_mask[row])
        t = int(self.entity_type[row])
        if not on:
            self.live[row] = False  # first: from here on the row is never returned
        delta = 1 if on else -1
        for d in range(self.type_counts.shape[0]):
            if mask >> d & 1:
                self.type_counts[d, t] += delta
        if on:
            self.live[row] = True  # last: everything else about the row is in place

    def apply(self, position: str, change: dict[str, Any], records: list[EntityRecord] | None = None) -> ApplyResult:
        """Apply one log entry (entries must come in log order; an entry at or before ``position`` is skipped).

        ``records``: the upsert's entities as ``check_change`` parsed them from this same change (the
        acknowledging worker's own entry); otherwise they are parsed here. Either way the same records.
        """
        with self.lock:
            if position_key(position) <= position_key(self.position):
                return ApplyResult(position=position, op=str(change.get("op")), skipped=-1)
            op = str(change.get("op"))
            if op == "upsert":
                if records is None:
                    records = [parse_entity(self.schema, item) for item in change["entities"]]
                res = self._upsert(records)
            elif op in ("pause", "resume", "delete"):
                res = self._switch(op, [str(i) for i in change["ids"]])
            else:
                raise LiveError(f"unknown op {op!r} in the change log at {position}")
            res.position = position
            self.position = position
            self.applied += 1
            self.last_lag_s = max(0.0, time.time() - stream_ms(position) / 1e3) if stream_ms(position) else 0.0
            return res

    def _upsert(self, records: list[EntityRecord]) -> ApplyResult:
        n = len(records)
        if self.count + n > self.capacity:
            raise LiveError(f"the live overlay is full ({self.count} of {self.capacity} rows): compact the log "
                            "into a new bundle (`unimatch index compact`)")
        old = [self.row_of(r.entity_id) for r in records]
        aid = np.empty((n, self.aid.shape[1]), dtype=np.float32)
        for i, (rec, r) in enumerate(zip(records, old, strict=True)):
            if r is None:
                aid[i] = self.encoder.cold[rec.entity_type]  # a new id: its type's cold-start id embedding
            elif r < self.E:
                aid[i] = self.encoder.id_embedding[r]
            else:
                aid[i] = self.aid[r - self.E]
        t0 = time.perf_counter()
        enc = self.encoder.encode(  # one onnxruntime call for the whole change (the GIL released inside)
            np.stack([r.cat for r in records]), np.stack([r.num for r in records]),
            np.array([r.entity_type for r in records], dtype=np.int64), aid,
        )
        self.encode_s += time.perf_counter() - t0
        rows = self.add_encoded_many(
            [r.entity_id for r in records], np.array([r.entity_type for r in records], dtype=np.int64),
            np.array([r.domain_mask for r in records], dtype=np.uint64), {name: enc[name] for name in self.tables},
            enc["vectors"], aid,
        )
        return ApplyResult(position="", op="upsert", rows=rows)

    def add_encoded(self, entity_id: str, entity_type: int, domain_mask: int, tensors: dict[str, np.ndarray],
                    vector: np.ndarray, aid: np.ndarray) -> int:
        """Append one encoded entity (its tensors, graph vector and id embedding); returns its row.

        The writer's step of an upsert after encoding (call it under ``lock``, in log order). Also what a
        benchmark uses to insert entities with known tensors, so it measures the graph insertion alone.
        """
        return self.add_encoded_many(
            [entity_id], np.array([entity_type], dtype=np.int64), np.array([domain_mask], dtype=np.uint64),
            {name: np.asarray(t)[None] for name, t in tensors.items()}, np.asarray(vector)[None], np.asarray(aid)[None],
        )[0]

    def add_encoded_many(self, entity_ids: list[str], entity_types: np.ndarray, domain_masks: np.ndarray,
                         tensors: dict[str, np.ndarray], vectors: np.ndarray, aid: np.ndarray) -> list[int]:
        """Append encoded entities in order (row ``E + count`` onward); returns their rows.

        Publication order per batch: every row's tables, type and domains are written, then the graph
        insertion of all of them (one compiled call, ``GraphOverlay.insert_many``: readers reach a new
        row only through its edges, added once its own lists are complete), then the rows' ids, and
        their live bits last. An id listed twice in one batch: its later row wins, the earlier goes dead.
        """
        n = len(entity_ids)
        if self.count + n > self.capacity:
            raise LiveError(f"the live overlay is full ({self.count} of {self.capacity} rows)")
        j0 = self.count
        row0 = self.E + j0
        for name, table in self.tables.items():
            table[j0 : j0 + n] = tensors[name]
        self.aid[j0 : j0 + n] = aid
        self.entity_type[row0 : row0 + n] = entity_types
        self.domain_mask[row0 : row0 + n] = domain_masks
        if self.overlay is not None:
            step = self.insert_chunk if self.insert_chunk > 0 else n
            for s in range(0, n, step):  # in chunks or not, the same graph (tests/service/test_overlay.py)
                if self.yield_to is not None and self.insert_chunk > 0:
                    self.yield_to()
                got = self.overlay.insert_many(vectors[s : s + step])
                if int(got[0]) != row0 + s:
                    raise RuntimeError(f"overlay row {int(got[0])} != catalogue row {row0 + s}")  # one writer: cannot happen
        rows = list(range(row0, row0 + n))
        for eid, row in zip(entity_ids, rows, strict=True):
            prev = self.row_of(eid)
            self.ids.append(eid)
            self.count += 1
            self._row[eid] = row
            if prev is not None:
                self._set_live(prev, False)  # the changed entity's old row goes dead
            if eid not in self.paused:
                self._set_live(row, True)
        return rows

    def _switch(self, op: str, ids: list[str]) -> ApplyResult:
        res = ApplyResult(position="", op=op)
        for eid in ids:
            row = self.row_of(eid)
            if row is None:
                res.skipped += 1
                continue
            if op == "pause":
                self.paused.add(eid)
                self._set_live(row, False)
            elif op == "resume":
                self.paused.discard(eid)
                self._set_live(row, True)
            else:  # delete: off for good; an upsert of the same id later is a new entity
                self._set_live(row, False)
                self.paused.discard(eid)
                self._row[eid] = -1
            res.rows.append(row)
        return res

    # ---- compaction -----------------------------------------------------------------------------------
    def status(self) -> np.ndarray:
        """(E + count,) int8: 0 live, 1 paused, 2 dead (deleted or superseded by a newer row)."""
        n = self.E + self.count
        out = np.where(self.live[:n], STATUS_LIVE, STATUS_DEAD).astype(np.int8)
        for eid in self.paused:
            r = self.row_of(eid)
            if r is not None:
                out[r] = STATUS_PAUSED
        return out
