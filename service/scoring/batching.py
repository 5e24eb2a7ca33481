"""Request batching: the expansion steps of concurrent requests merged into one device call.

The GPU serving path: where one request cannot fill the device, a batcher thread scores the frontiers
of every request waiting at that moment in ONE call (see ``BatchingScorer``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from contracts.bundle import Bundle
from service.scoring.binding import run_bound
from service.scoring.device import DeviceGatherScorer, gather_inside_graph
from service.scoring.host import CPU, CUDA, HostGatherScorer, UserContext, session_options

_NO_SCORES = np.empty(0, dtype=np.float32)  # placeholder of a request not yet scored in a merged step


class BatchingUnsupported(RuntimeError):
    """The exported pair scorer does not broadcast a per-candidate user batch (see gather_inside_graph)."""


class _Pending:
    """One expansion step of one request, waiting for the batcher thread."""

    __slots__ = ("ctx", "rows", "done", "scores", "error", "seconds")

    def __init__(self, ctx: UserContext, rows: np.ndarray) -> None:
        self.ctx, self.rows = ctx, rows
        self.done = threading.Event()
        self.scores: np.ndarray | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0


class BatchingScorer(DeviceGatherScorer):
    """Merges the expansion steps of concurrent requests into one device call (the GPU serving path).

    Each request thread enqueues its frontier and waits; one batcher thread takes everything queued
    at that moment (no added wait: while the device runs one call, the next batch accumulates) and
    scores it in ONE call. With the bundle's ``pair_scorer_batched.onnx`` (``unimatch export`` writes
    it for deep models) that call takes the stacked user outputs (U, ...), each user's domain, and
    ``rows`` (U, C_max), every request's frontier padded to the longest; the entity tables stay
    resident on the device and are gathered inside the graph. Older bundles fall back to stacking users
    on ``pair_scorer.onnx`` with a per-candidate ``user_index`` (grouped by domain), which only works
    when that graph broadcasts a per-candidate user axis: checked at load (``BatchingUnsupported``).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        provider: str = CUDA,
        intra_op_threads: int = 1,
        max_batch: int = 65536,
        fp16_tables: bool = False,
        device_id: int = 0,
        max_pairs_per_call: int = 262144,  # bounds device activation memory of one merged call
    ) -> None:
        spec = bundle.manifest.get("batched_scorer")
        self.batched_file: str | None = str(spec["file"]) if isinstance(spec, dict) and spec.get("file") else None
        super().__init__(
            bundle, provider=provider, intra_op_threads=intra_op_threads, max_batch=max_batch,
            fp16_tables=fp16_tables, device_id=device_id,
        )
        self.max_pairs_per_call = int(max_pairs_per_call)
        self.calls = 0
        self.merged_steps = 0
        self._check_broadcasting()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._loop, name="unimatch-scorer-batcher", daemon=True)
        self._worker.start()

    def _pair_session(self, ort: Any, so: Any, providers: list[str]) -> Any:
        if self.batched_file is not None:
            blob = gather_inside_graph(
                str(self.bundle.path / self.batched_file),
                list(self.bundle.entity_tensors),
                fp16_tables=self.fp16_tables,
                rows_dims=("users", "candidates"),
            )
        else:
            blob = gather_inside_graph(
                str(self.bundle.path / "pair_scorer.onnx"),
                list(self.bundle.entity_tensors),
                fp16_tables=self.fp16_tables,
                batch_users=self.user_outputs,
            )
        return ort.InferenceSession(blob, so, providers=providers)

    def encode(self, cat: np.ndarray, num: np.ndarray, seq: np.ndarray, domain: int) -> UserContext:
        return HostGatherScorer.encode(self, cat, num, seq, domain)  # stacked per call, not uploaded per request

    def _check_broadcasting(self) -> None:
        """Score two different users in one call and compare with the exported graph, user by user."""
        import onnxruntime as ort

        ref = ort.InferenceSession(
            str(self.bundle.path / "pair_scorer.onnx"), session_options(1), providers=[CPU]
        )
        schema = self.bundle.schema
        n = min(self.bundle.num_entities, 16)
        seq = np.full(schema.max_seq_len, -1, dtype=np.int64)
        seq[-min(3, n) :] = np.arange(min(3, n))
        users = [
            self.encode(np.zeros(len(schema.user_categorical)), np.zeros(len(schema.user_numeric)), np.full_like(seq, -1), 0),
            self.encode(np.ones(len(schema.user_categorical)), np.ones(len(schema.user_numeric)), seq, 0),
        ]
        rows = np.arange(n, dtype=np.int64)
        try:
            got = self._run_group([_Pending(u, rows) for u in users])
        except Exception as exc:  # onnxruntime raises its own types for shape errors
            raise BatchingUnsupported(f"user-batched pair scorer fails: {str(exc).splitlines()[0]}") from None
        for u, scores in zip(users, got, strict=True):
            feeds = dict(u.feeds)
            for name, table in self.tables.items():
                feeds[name] = np.take(table, rows, axis=0)
            want = ref.run(["score"], feeds)[0].reshape(-1)
            if not np.allclose(scores, want, rtol=1e-2 if self.fp16_tables else 1e-4, atol=1e-3):
                raise BatchingUnsupported("user-batched pair scorer disagrees with the exported graph")

    def _score_batch(self, ctx: UserContext, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
        item = _Pending(ctx, np.ascontiguousarray(rows, dtype=np.int64))
        self._queue.put(item)
        item.done.wait()
        if item.error is not None or item.scores is None:
            raise item.error or RuntimeError("scorer batcher returned no scores")
        return item.scores, 0.0, item.seconds

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, pairs, stop = [first], first.rows.size, False
            while pairs < self.max_pairs_per_call:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                pairs += nxt.rows.size
            groups: dict[int, list[_Pending]] = {}
            for item in batch:  # the batched graph takes a domain per user: one group for all
                groups.setdefault(-1 if self.batched_file is not None else item.ctx.domain, []).append(item)
            for items in groups.values():
                try:
                    t0 = time.perf_counter()
                    results = self._run_group(items)
                    dt = time.perf_counter() - t0
                    for item, scores in zip(items, results, strict=True):
                        item.scores, item.seconds = scores, dt
                except BaseException as exc:  # hand the error to every waiting request
                    for item in items:
                        item.error = exc
                finally:
                    for item in items:
                        item.done.set()
            if stop:
                return

    def score_many(
        self, ctxs: Sequence[UserContext], rows: Sequence[np.ndarray], *, merged: bool = True
    ) -> tuple[list[np.ndarray], float, float]:
        """The lockstep search's step: every request's rows in one device call (``_run_group``, chunked at
        ``max_pairs_per_call``), called directly, not through the batcher thread's queue."""
        items = [_Pending(c, np.ascontiguousarray(r, dtype=np.int64)) for c, r in zip(ctxs, rows, strict=True)]
        out: list[np.ndarray] = []
        t0 = time.perf_counter()
        i = 0
        while i < len(items):
            j, pairs = i, 0
            while j < len(items) and (j == i or pairs + items[j].rows.size <= self.max_pairs_per_call):
                pairs += items[j].rows.size
                j += 1
            group = items[i:j]
            if self.batched_file is None:  # the fallback graph takes one domain per call
                by_domain: dict[int, list[int]] = {}
                for n, it in enumerate(group):
                    by_domain.setdefault(it.ctx.domain, []).append(n)
                part: list[np.ndarray] = [_NO_SCORES] * len(group)
                for idx in by_domain.values():
                    for n, sc in zip(idx, self._run_group([group[n] for n in idx]), strict=True):
                        part[n] = sc
                out.extend(part)
            else:
                out.extend(self._run_group(group))
            i = j
        return out, 0.0, time.perf_counter() - t0

    def _run_group(self, items: list[_Pending]) -> list[np.ndarray]:
        """One device call for the group's requests; returns each request's scores."""
        if self.batched_file is not None:
            return self._run_batched(items)
        sizes = np.array([it.rows.size for it in items], dtype=np.int64)
        rows = np.concatenate([it.rows for it in items])
        user_index = np.repeat(np.arange(len(items), dtype=np.int64), sizes)
        host: dict[str, np.ndarray] = {
            f"{name}__users": np.concatenate([it.ctx.feeds[name] for it in items]) for name in self.user_outputs
        }
        if "domain" in items[0].ctx.feeds:
            host["domain"] = items[0].ctx.feeds["domain"]
        host.update(rows=rows, user_index=user_index)
        out = run_bound(self.pair_session, self.device_tables, host, device=self.device, device_id=self.device_id).reshape(-1)
        self.calls += 1
        self.merged_steps += len(items)
        return np.split(out, np.cumsum(sizes)[:-1])

    def _run_batched(self, items: list[_Pending]) -> list[np.ndarray]:
        """``pair_scorer_batched.onnx``: rows (U, C_max), shorter frontiers padded with their first row."""
        sizes = [it.rows.size for it in items]
        width = max(max(sizes), 1)
        rows = np.empty((len(items), width), dtype=np.int64)
        for i, it in enumerate(items):
            rows[i, : it.rows.size] = it.rows
            rows[i, it.rows.size :] = it.rows[0] if it.rows.size else 0  # padding: scored, then dropped
        host = {name: np.concatenate([it.ctx.feeds[name] for it in items]) for name in self.user_outputs}
        host.update(domain=np.array([it.ctx.domain for it in items], dtype=np.int64), rows=rows)
        out = run_bound(self.pair_session, self.device_tables, host, device=self.device, device_id=self.device_id)
        out = out.reshape(len(items), width)
        self.calls += 1
        self.merged_steps += len(items)
        return [out[i, :n].copy() for i, n in enumerate(sizes)]

    def close(self) -> None:
        """Stop the batcher thread (pending requests are answered first)."""
        self._queue.put(None)
        self._worker.join(timeout=5)


