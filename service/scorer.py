"""The model side of the retrieval engine: onnxruntime sessions for the user encoder and pair scorer.

Paper section IV-B: the deep model itself scores every candidate the graph search reaches. The user
encoder runs once per request; the pair scorer runs once per expansion step on the whole frontier
(NANN: "score all of N with the model in ONE batch"). Two scorers share one interface:

* ``HostGatherScorer`` (CPU, and any provider without device-resident tables): entity-side tensors are
  gathered with numpy fancy indexing from the bundle's memory maps, then fed to ``pair_scorer.onnx``.
* ``DeviceGatherScorer`` (CUDA; also runs on CPU for tests): the pair scorer is rewritten once at load so
  that it takes ``rows`` (batch,) int64 and the whole entity tables as inputs and gathers inside the
  graph. The tables are uploaded once as OrtValues (optionally float16, cast back to float32 right after
  the gather: half the memory and gather bandwidth, the MLP stays float32) and bound with IOBinding, so
  a step moves only the row indices to the device and the scores back.

Session options are chosen for a serving process that runs many requests concurrently on a thread
pool (see ``session_options``). This module imports onnxruntime and numpy (and onnx, lazily, only for
the graph rewrite); never torch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.bundle import Bundle, BundleError

log = logging.getLogger("unimatch.scorer")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def session_options(intra_op_threads: int) -> Any:
    """onnxruntime session options for serving; every choice is deliberate.

    * ``intra_op_num_threads``: the service parallelises across requests (one request per worker
      thread, ``InferenceSession.run`` releases the GIL and is thread-safe), so the default is 1 thread
      per call: no fork/join cost on small frontiers and no oversubscription. Raise it only for a
      single-stream latency benchmark with spare cores.
    * spinning off (``session.intra_op.allow_spinning = 0``): idle pool threads would otherwise busy-wait
      after each call and steal the cores other requests need; with 1 thread there is no pool at all.
    * ``inter_op_num_threads = 1`` and sequential execution: these graphs are chains; a parallel
      executor only adds scheduling overhead.
    * full graph optimisation (constant folding, GEMM/activation fusion) at load, once.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initialisers are noise in serving logs
    return so


def choose_provider(requested: Sequence[str] | None) -> str:
    """CUDA when requested (or not specified) and available, else CPU — with a log line, never silently."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(requested) if requested is not None else [CUDA, CPU]
    unknown = [p for p in wanted if p not in (CUDA, CPU)]
    if unknown or not wanted:
        raise ValueError(f"unsupported onnxruntime providers {unknown or wanted}; use {CUDA!r} and/or {CPU!r}")
    if CUDA in wanted:
        if CUDA in available:
            return CUDA
        log.warning("onnxruntime CUDA provider not available (providers: %s); scoring on CPU", ", ".join(available))
    return CPU


@dataclass
class UserContext:
    """The user encoder's outputs for one request, ready to feed the pair scorer."""

    domain: int
    feeds: dict[str, np.ndarray]  # user outputs (leading dim 1) + "domain" (1,) int64
    device_values: dict[str, Any] = field(default_factory=dict)  # OrtValues on the scorer's device


class HostGatherScorer:
    """Pair scorer with entity tensors gathered on the host from memory maps (the CPU path)."""

    def __init__(
        self, bundle: Bundle, *, provider: str = CPU, intra_op_threads: int = 1, max_batch: int = 16384
    ) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.provider = provider
        self.intra_op_threads = intra_op_threads
        # Bounds activation memory per call; a frontier larger than this is split (exhaustive mode).
        self.max_batch = int(max_batch)
        providers = [provider] if provider == CPU else [provider, CPU]
        so = session_options(intra_op_threads)
        self.user_outputs = list(bundle.manifest.get("user_outputs", []))
        self.user_session = ort.InferenceSession(str(bundle.path / "user_encoder.onnx"), so, providers=providers)
        self.pair_session = self._pair_session(ort, so, providers)
        got = [o.name for o in self.user_session.get_outputs()]
        missing = [n for n in self.user_outputs if n not in got]
        if missing:
            raise BundleError(f"{bundle.path}: user_encoder.onnx lacks outputs {missing} named in manifest.user_outputs")
        self.live: Any = None  # the engine's LiveCatalogue when live changes are on (rows beyond the bundle's)
        # Plain ndarray views of the memory maps: fancy indexing on np.memmap adds subclass overhead.
        self.tables = {name: np.asarray(arr) for name, arr in bundle.entity_tensors.items()}
        self._user_input_names = {i.name for i in self.user_session.get_inputs()}
        # An exporter drops inputs the graph does not use (e.g. `domain` of a domain-agnostic scorer).
        self._pair_input_names = {i.name for i in self.pair_session.get_inputs()}

    def _pair_session(self, ort: Any, so: Any, providers: list[str]) -> Any:
        return ort.InferenceSession(str(self.bundle.path / "pair_scorer.onnx"), so, providers=providers)

    def encode(self, cat: np.ndarray, num: np.ndarray, seq: np.ndarray, domain: int) -> UserContext:
        """Run the user encoder once: (Cu,), (Cn,), (L,) -> the pair scorer's user inputs."""
        dom = np.array([domain], dtype=np.int64)
        feeds = {
            "user_cat": np.asarray(cat, dtype=np.int64).reshape(1, -1),
            "user_num": np.asarray(num, dtype=np.float32).reshape(1, -1),
            "seq": np.asarray(seq, dtype=np.int64).reshape(1, -1),
            "domain": dom,
        }
        feeds = {k: v for k, v in feeds.items() if k in self._user_input_names}
        outs = self.user_session.run(self.user_outputs, feeds)
        ctx = {name: np.ascontiguousarray(o) for name, o in zip(self.user_outputs, outs, strict=True)}
        if "domain" in self._pair_input_names:
            ctx["domain"] = dom
        ctx = {k: v for k, v in ctx.items() if k in self._pair_input_names or f"{k}__users" in self._pair_input_names}
        return UserContext(domain=domain, feeds=ctx)

    def score(self, ctx: UserContext, rows: np.ndarray) -> np.ndarray:
        """(n,) int64 rows -> (n,) float32 scores; one onnxruntime call per ``max_batch`` rows."""
        return self.score_timed(ctx, rows)[0]

    def score_timed(self, ctx: UserContext, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
        """``score`` plus (seconds gathering entity tensors, seconds inside onnxruntime calls)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size <= self.max_batch:
            return self._score_batch(ctx, rows)
        parts = [self._score_batch(ctx, rows[i : i + self.max_batch]) for i in range(0, rows.size, self.max_batch)]
        return np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts), sum(p[2] for p in parts)

    def _score_batch(self, ctx: UserContext, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        feeds = dict(ctx.feeds)
        live = self.live
        if live is not None and rows.size and int(rows.max()) >= live.E:  # rows added online (service/live.py)
            for name, table in self.tables.items():
                feeds[name] = live.gather(name, table, rows)
        else:
            for name, table in self.tables.items():
                feeds[name] = np.take(table, rows, axis=0)  # np.take: faster than fancy indexing for row gathers
        t1 = time.perf_counter()
        (out,) = self.pair_session.run(["score"], feeds)
        t2 = time.perf_counter()
        return np.asarray(out, dtype=np.float32).reshape(-1), t1 - t0, t2 - t1


def gather_inside_graph(
    model_path: str,
    tensor_names: Sequence[str],
    *,
    fp16_tables: bool = False,
    batch_users: Sequence[str] = (),
    rows_dims: Sequence[str] = ("batch",),
) -> bytes:
    """Rewrite ``pair_scorer.onnx`` to take ``rows`` (batch,) and whole entity tables ``<name>__table``.

    Each entity-tensor input ``<name>`` becomes ``Gather(<name>__table, rows)`` (+ ``Cast`` to float32
    when the tables are float16), so candidates are gathered where the tables live. With
    ``batch_users`` (the user-output names), each of those inputs becomes
    ``Gather(<name>__users, user_index)``: one call then scores candidates of several users (of one
    domain), which is how concurrent requests share a GPU call. That only works when the exported graph
    broadcasts the user inputs' leading dimension (checked by ``BatchingScorer``). Returns the
    serialised model. ``rows_dims`` names the axes of ``rows``: ``("users", "candidates")`` for
    ``pair_scorer_batched.onnx``, whose entity inputs are (U, C, ...). Needs the ``onnx`` package.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(model_path)
    g = model.graph
    by_name = {i.name: i for i in g.input}
    new_inputs = [helper.make_tensor_value_info("rows", TensorProto.INT64, list(rows_dims))]
    new_nodes = []
    for name in tensor_names:
        if name not in by_name:
            raise BundleError(f"{model_path}: pair scorer has no input {name!r} named in manifest.entity_tensors")
        dims = [d.dim_param or d.dim_value for d in by_name[name].type.tensor_type.shape.dim]
        elem = TensorProto.FLOAT16 if fp16_tables else TensorProto.FLOAT
        feature_dims = dims[len(rows_dims) :]  # Gather(table, rows) has shape rows.shape + table.shape[1:]
        new_inputs.append(helper.make_tensor_value_info(f"{name}__table", elem, ["num_entities", *feature_dims]))
        if fp16_tables:
            new_nodes.append(helper.make_node("Gather", [f"{name}__table", "rows"], [f"{name}__h"], axis=0))
            new_nodes.append(helper.make_node("Cast", [f"{name}__h"], [name], to=TensorProto.FLOAT))
        else:
            new_nodes.append(helper.make_node("Gather", [f"{name}__table", "rows"], [name], axis=0))
    if batch_users:
        new_inputs.append(helper.make_tensor_value_info("user_index", TensorProto.INT64, ["batch"]))
    for name in batch_users:
        if name not in by_name:
            raise BundleError(f"{model_path}: pair scorer has no input {name!r} named in manifest.user_outputs")
        vi = by_name[name].type.tensor_type
        dims = [d.dim_param or d.dim_value for d in vi.shape.dim]
        new_inputs.append(helper.make_tensor_value_info(f"{name}__users", vi.elem_type, ["users", *dims[1:]]))
        new_nodes.append(helper.make_node("Gather", [f"{name}__users", "user_index"], [name], axis=0))
    replaced = set(tensor_names) | set(batch_users)
    kept = [i for i in g.input if i.name not in replaced]
    del g.input[:]
    g.input.extend(kept + new_inputs)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class DeviceGatherScorer(HostGatherScorer):
    """Entity tables resident on the scorer's device, gathered inside the graph, bound with IOBinding.

    The GPU path (``provider=CUDA``); with ``provider=CPU`` it is the same code on host memory, which
    is how the unit tests check it against ``HostGatherScorer``.
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
    ) -> None:
        self.fp16_tables = fp16_tables
        self.device = "cuda" if provider == CUDA else "cpu"
        self.device_id = device_id
        super().__init__(bundle, provider=provider, intra_op_threads=intra_op_threads, max_batch=max_batch)
        import onnxruntime as ort

        dtype = np.float16 if fp16_tables else np.float32
        # Uploaded once; every request binds the same device buffers.
        self.device_tables = {
            f"{name}__table": ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(table, dtype=dtype), self.device, device_id
            )
            for name, table in self.tables.items()
        }

    def _pair_session(self, ort: Any, so: Any, providers: list[str]) -> Any:
        blob = gather_inside_graph(
            str(self.bundle.path / "pair_scorer.onnx"), list(self.bundle.entity_tensors), fp16_tables=self.fp16_tables
        )
        return ort.InferenceSession(blob, so, providers=providers)

    def encode(self, cat: np.ndarray, num: np.ndarray, seq: np.ndarray, domain: int) -> UserContext:
        import onnxruntime as ort

        ctx = super().encode(cat, num, seq, domain)
        # The user outputs go to the device once per request, not once per expansion step.
        ctx.device_values = {
            n: ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for n, a in ctx.feeds.items()
        }
        return ctx

    def _score_batch(self, ctx: UserContext, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        io = self.pair_session.io_binding()
        for name, value in self.device_tables.items():
            io.bind_ortvalue_input(name, value)
        for name, value in ctx.device_values.items():
            io.bind_ortvalue_input(name, value)
        io.bind_cpu_input("rows", np.ascontiguousarray(rows, dtype=np.int64))
        io.bind_output("score", self.device, self.device_id)
        t1 = time.perf_counter()
        self.pair_session.run_with_iobinding(io)
        out = np.asarray(io.copy_outputs_to_cpu()[0], dtype=np.float32).reshape(-1)
        # The gather itself runs inside the graph (counted as scorer time); t1 - t0 is the binding cost.
        return out, t1 - t0, time.perf_counter() - t1


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

    def _run_group(self, items: list[_Pending]) -> list[np.ndarray]:
        """One device call for the group's requests; returns each request's scores."""
        if self.batched_file is not None:
            return self._run_batched(items)
        sizes = np.array([it.rows.size for it in items], dtype=np.int64)
        rows = np.concatenate([it.rows for it in items])
        user_index = np.repeat(np.arange(len(items), dtype=np.int64), sizes)
        io = self.pair_session.io_binding()
        for name, value in self.device_tables.items():
            io.bind_ortvalue_input(name, value)
        for name in self.user_outputs:
            io.bind_cpu_input(f"{name}__users", np.ascontiguousarray(np.concatenate([it.ctx.feeds[name] for it in items])))
        if "domain" in items[0].ctx.feeds:
            io.bind_cpu_input("domain", items[0].ctx.feeds["domain"])
        io.bind_cpu_input("rows", rows)
        io.bind_cpu_input("user_index", user_index)
        io.bind_output("score", self.device, self.device_id)
        self.pair_session.run_with_iobinding(io)
        out = np.asarray(io.copy_outputs_to_cpu()[0], dtype=np.float32).reshape(-1)
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
        io = self.pair_session.io_binding()
        for name, value in self.device_tables.items():
            io.bind_ortvalue_input(name, value)
        for name in self.user_outputs:
            io.bind_cpu_input(name, np.ascontiguousarray(np.concatenate([it.ctx.feeds[name] for it in items])))
        io.bind_cpu_input("domain", np.array([it.ctx.domain for it in items], dtype=np.int64))
        io.bind_cpu_input("rows", rows)
        io.bind_output("score", self.device, self.device_id)
        self.pair_session.run_with_iobinding(io)
        out = np.asarray(io.copy_outputs_to_cpu()[0], dtype=np.float32).reshape(len(items), width)
        self.calls += 1
        self.merged_steps += len(items)
        return [out[i, :n].copy() for i, n in enumerate(sizes)]

    def close(self) -> None:
        """Stop the batcher thread (pending requests are answered first)."""
        self._queue.put(None)
        self._worker.join(timeout=5)


def make_scorer(
    bundle: Bundle,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 1,
    fp16_tables: bool = False,
    batch_requests: bool | None = None,
) -> HostGatherScorer:
    """The scorer for this machine: on CUDA, device-resident tables and (by default) concurrent requests
    merged into one call; on CPU, host gathers (batching buys nothing where each request has a core)."""
    provider = choose_provider(providers)
    if batch_requests is None:
        batch_requests = provider == CUDA
    try:
        if batch_requests:
            try:
                return BatchingScorer(bundle, provider=provider, intra_op_threads=intra_op_threads, fp16_tables=fp16_tables)
            except BatchingUnsupported as exc:
                log.warning("not batching concurrent requests: %s", exc)
        if provider == CUDA:
            return DeviceGatherScorer(bundle, provider=CUDA, intra_op_threads=intra_op_threads, fp16_tables=fp16_tables)
    except ImportError as exc:  # the graph rewrite needs `onnx`
        log.warning("device-side gather needs the onnx package (%s); gathering on the host instead", exc)
    return HostGatherScorer(bundle, provider=provider, intra_op_threads=intra_op_threads)
