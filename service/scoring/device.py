"""The device scoring path: entity tables resident on the scorer's device, gathered inside the graph.

The pair scorer is rewritten once at load (``gather_inside_graph``) so that it takes ``rows`` (batch,)
int64 and the whole entity tables as inputs and gathers inside the graph. The tables are uploaded once
as OrtValues (optionally float16, cast back to float32 right after the gather: half the memory and
gather bandwidth, the MLP stays float32) and bound with IOBinding, so a step moves only the row indices
to the device and the scores back. CUDA in production; the same code runs on CPU for the tests.
Needs the ``onnx`` package for the rewrite (imported lazily).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from contracts.bundle import Bundle
from contracts.manifest import BundleError
from service.scoring.binding import run_bound
from service.scoring.host import CUDA, HostGatherScorer, UserContext


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
        out = run_bound(
            self.pair_session, {**self.device_tables, **ctx.device_values},
            {"rows": np.asarray(rows, dtype=np.int64)}, device=self.device, device_id=self.device_id,
        ).reshape(-1)
        # The gather runs inside the graph: all of it is scorer time (binding included, microseconds).
        return out, 0.0, time.perf_counter() - t0


