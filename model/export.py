"""Export a trained run to a serving bundle (docs/bundle-format.md; paper IV-B, V-A3).

Only the scoring path goes to ONNX (the RRL modules are training-only, V-A3), split by what changes
when:

* ``user_encoder.onnx``: embeddings + user transformer + the target attention's key projection,
  once per request;
* ``pair_scorer.onnx``: target attention, experts, gate, tower -> one logit per candidate, batch dim
  dynamic; the domain's expert and tower are selected inside the graph by a Gather on the stacked
  weights, so one graph serves every domain;
* ``entities/*.npy``: the entity-side tensors precomputed for every entity, and ``vectors.npy``,
  the L2 space the HNSW graph is built on.

Every export runs ``onnx.checker`` and compares onnxruntime with PyTorch on random and real inputs;
a difference above ``atol`` (1e-4 in float32) fails the export and nothing is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from contracts.dataset import TEST, Dataset, serving_sequences
from contracts.io import atomic_directory, atomic_write_json, sha256_file
from model.backbones import Backbone, DeepMatchingModel, MatchingModel, TwoTowerModel
from model.checkpoint import load_run
from model.embeddings import CategoricalEmbedding
from model.experts import concat_fusion
from model.layers import Domains

BUNDLE_FORMAT_VERSION = 1


class ExportError(ValueError):
    """The exported graphs fail the checker or disagree with PyTorch."""


@dataclass(frozen=True)
class ExportConfig:
    run: Path
    out: Path
    data: Path | None = None  # default: the dataset the run was trained on
    opset: int = 17
    # largest |ONNX - PyTorch| accepted in float32: above it the export is refused, since the served
    # scores would no longer be the trained model's
    atol: float = 1e-4
    entity_batch: int = 8192
    parity_users: int = 8  # random + real users checked per domain
    parity_candidates: int = 257  # odd on purpose: exercises the dynamic batch dim
    # Entities whose tensors the entity encoder must reproduce at export (random rows + first + last);
    # every row costs one encoder evaluation, so the whole of a 1M catalogue is not checked.
    parity_entities: int = 4096
    # Precompute the entity part of both experts' first layers (Backbone only): fewer multiply-adds
    # per candidate for E x (1 + K) x h1 more floats in the bundle (see docs/model.md for measurements).
    first_layer_split: bool = False


class UserEncoderGraph(nn.Module):
    """(user_cat, user_num, seq, domain) -> the user outputs, in ``model.user_output_names`` order."""

    def __init__(self, model: MatchingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_cat: Tensor, user_num: Tensor, seq: Tensor, domain: Tensor) -> tuple[Tensor, ...]:
        out = self.model.user(user_cat, user_num, seq, domain)
        return tuple(out[n] for n in self.model.user_output_names)


class PairScorerGraph(nn.Module):
    """(*user outputs, domain, *entity tensors) -> score (batch,): the domain tower's logit, no log-Q."""

    domain_zero: Tensor  # buffer (num_domains,)

    def __init__(self, model: MatchingModel, num_domains: int) -> None:
        super().__init__()
        self.model = model
        self.n_user = len(model.user_output_names)
        # Exact zeros gathered by domain: models whose scorer ignores the domain (DNN, two-tower) would
        # otherwise lose the ``domain`` input from the traced graph and break the bundle's one signature.
        self.register_buffer("domain_zero", torch.zeros(num_domains), persistent=False)

    def forward(self, *inputs: Tensor) -> Tensor:
        names_u, names_e = self.model.user_output_names, self.model.entity_tensor_names
        user = dict(zip(names_u, inputs[: self.n_user], strict=True))
        domain = inputs[self.n_user]
        ent = dict(zip(names_e, inputs[self.n_user + 1 :], strict=True))
        logits, _ = self.model.score(user, ent, domain)  # (1, batch)
        return logits[0] + self.domain_zero[domain]


class BatchedPairScorerGraph(nn.Module):
    """(*user outputs (U, ...), domain (U,), *entity tensors (U, C, ...)) -> score (U, C).

    Each of U users scores its own C candidates (``model.layers.PairInputs`` with per-user entities):
    what a serving process needs to merge the expansion steps of concurrent requests into one call
    (``service.scoring.batching.BatchingScorer``), at U x C pairs instead of the U x (U C) of stacking users on
    ``pair_scorer.onnx``'s cross product. Shorter candidate lists are padded by the caller.
    """

    def __init__(self, model: DeepMatchingModel, num_domains: int) -> None:
        super().__init__()
        self.model = model
        self.n_user = len(model.user_output_names)
        self.register_buffer("domain_zero", torch.zeros(num_domains), persistent=False)

    domain_zero: Tensor

    def forward(self, *inputs: Tensor) -> Tensor:
        names_u, names_e = self.model.user_output_names, self.model.entity_tensor_names
        user = dict(zip(names_u, inputs[: self.n_user], strict=True))
        domain = inputs[self.n_user]
        ent = dict(zip(names_e, inputs[self.n_user + 1 :], strict=True))
        logits, _ = self.model.score(user, ent, domain)  # (U, C)
        return logits + self.domain_zero[domain].unsqueeze(1)


def check_batched_parity(batched_path: Path, scorer_path: Path, user_outputs: dict[str, np.ndarray],
                         ents: dict[str, np.ndarray], num_domains: int, *, users: int = 3, candidates: int = 17,
                         seed: int = 1) -> float:
    """Max |batched scorer - per-user pair scorer| for ``users`` users, each with its own candidates."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    b_sess = ort.InferenceSession(str(batched_path), opts, providers=["CPUExecutionProvider"])
    s_sess = ort.InferenceSession(str(scorer_path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    num_entities = next(iter(ents.values())).shape[0]
    rows = rng.integers(0, num_entities, size=(users, candidates))
    # distinct users: one user's outputs (leading dim 1) shifted per row; the 0/1 mask is all ones for odd
    # rows, so that the target attention over the (shifted) sequence is exercised whatever the example
    stacked = {n: np.concatenate([v + np.float32(0.1 * i) if n != "seq_mask" else (np.ones_like(v) if i % 2 else v)
                                  for i in range(users)])
               for n, v in user_outputs.items()}
    domains = rng.integers(0, num_domains, size=users).astype(np.int64)
    feed = {**stacked, "domain": domains, **{n: t[rows] for n, t in ents.items()}}
    (got,) = b_sess.run(["score"], feed)
    worst = 0.0
    for i in range(users):
        one = {n: v[i : i + 1] for n, v in stacked.items()}
        (want,) = s_sess.run(["score"], {**one, "domain": domains[i : i + 1], **{n: t[rows[i]] for n, t in ents.items()}})
        worst = max(worst, float(np.abs(got[i] - want).max()))
    return worst


class SplitBackboneScorer(nn.Module):
    """The Backbone's pair scorer with the entity part of both experts' first layers precomputed.

    Exact: a first layer over R = [user, entity, pair] is W_u user + W_e entity + W_p pair + b
    (``layers.SplitLinear``). ``W_e entity`` is computed once per entity at export, for the shared
    expert (E, h1) and for every domain expert (E, K, h1); per candidate the scorer then pays only the
    target attention, the pair part and the layers above. Inputs: the user outputs, ``domain``,
    ``ent_aid`` (attention query), ``ent_first_shared``, ``ent_first_domain``.
    """

    ENTITY_INPUTS = ("ent_aid", "ent_first_shared", "ent_first_domain")

    domain_zero: Tensor  # buffer (num_domains,)

    def __init__(self, model: DeepMatchingModel, num_domains: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("domain_zero", torch.zeros(num_domains), persistent=False)

    @staticmethod
    @torch.no_grad()
    def precompute(model: DeepMatchingModel, ents: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        du, de, _ = model.encoder.pair_dims
        entity = torch.from_numpy(np.concatenate([ents["ent_uee"], ents["ent_aid"]], axis=1))  # (E, De)
        bb = cast(Backbone, model.backbone)  # export() checks arch is Architecture.BACKBONE
        w_s = bb.shared.net.first.linear.weight[:, du : du + de]  # (h1, De)
        w_d = bb.specific.net.first.weight[:, du : du + de]  # (K, De, h1)
        return {
            "ent_first_shared": (entity @ w_s.t()).numpy().astype(np.float32),  # (E, h1)
            "ent_first_domain": torch.einsum("ei,kio->eko", entity, w_d).numpy().astype(np.float32),  # (E, K, h1)
        }

    def forward(self, seq_keys: Tensor, seq_vals: Tensor, seq_mask: Tensor, user_repr: Tensor, domain: Tensor,
                ent_aid: Tensor, ent_first_shared: Tensor, ent_first_domain: Tensor) -> Tensor:
        enc, bb = self.model.encoder, cast(Backbone, self.model.backbone)  # arch checked by export()
        du, de, _ = enc.pair_dims
        e_att = enc.target_attention(ent_aid, seq_keys, seq_vals, seq_mask)[0]  # (batch, d)
        lin = bb.shared.net.first.linear
        w = lin.weight  # (h1, Du + De + Dp)
        h_s = ent_first_shared + e_att @ w[:, du + de :].t() + (user_repr @ w[:, :du].t() + lin.bias)
        h_s = bb.shared.net.rest(torch.relu(h_s)) if bb.shared.net.rest is not None else torch.relu(h_s)
        first = bb.specific.net.first
        wd = first.weight[domain][0]  # (in, h1): Gather on the stacked weights
        ent_d = torch.gather(
            ent_first_domain, 1, domain.reshape(1, 1, 1).expand(ent_first_domain.shape[0], 1, ent_first_domain.shape[2])
        ).squeeze(1)  # (batch, h1): this domain's precomputed entity part
        h_d = ent_d + e_att @ wd[du + de :] + (user_repr @ wd[:du] + first.bias[domain])
        dom = Domains(domain, self.domain_zero.shape[0])
        h_d = torch.relu(h_d).unsqueeze(0)  # (1, batch, h1)
        if bb.specific.net.rest is not None:
            h_d = bb.specific.net.rest(h_d, dom)
        gate = bb.gate(user_repr[:, -self.model.domain_dim :], dom)
        logits = bb.towers(concat_fusion(h_s.unsqueeze(0), h_d, gate), dom)  # (1, batch)
        return logits[0] + self.domain_zero[domain]


ENTITY_ENCODER_FILE = "entity_encoder.onnx"
ENTITY_ENCODER_INPUTS = ("ent_cat", "ent_num", "ent_type", "id_embedding")
COLD_ID_FILE = "entities/cold_id_embedding.npy"


class EntityEncoderGraph(nn.Module):
    """(ent_cat, ent_num, ent_type, id_embedding) -> every entity tensor of the bundle + ``vectors``.

    The entity side of the serving split (paper III-B: E_a -> ad network -> E_uee, with E_aid) as a graph
    of its own, so that the service can encode an entity that was not in the catalogue at export (a
    live upsert) into exactly what the pair scorer and the HNSW graph need. ``id_embedding`` (n, d) is
    the entity's E_aid row: for an entity of the bundle, its own row of ``manifest.entity_encoder.
    id_embedding``; for a new one, its type's row of ``cold_id_embedding`` (the mean trained E_aid of
    that type: the id embedding a never-seen id gets, since none was trained for it).
    """

    def __init__(self, model: MatchingModel, names: list[str], split: bool) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.split = split

    def forward(self, ent_cat: Tensor, ent_num: Tensor, ent_type: Tensor, id_embedding: Tensor) -> tuple[Tensor, ...]:
        enc = self.model.encoder
        emb = enc.emb
        # E_a as SharedEmbeddings.entity computes it, with the bags pooled by a matmul (bag_embedding)
        e_a = torch.cat([bag_embedding(emb.entity_cat, ent_cat), ent_num, emb.entity_type(ent_type.long())], dim=-1)
        ent = {"ent_uee": enc.ad_net(e_a), "ent_aid": id_embedding * 1.0}  # (n, d) each; *1: an output, not the input
        if isinstance(self.model, TwoTowerModel):
            ent = {"ent_vec": self.model.entity_tower(torch.cat([ent["ent_uee"], ent["ent_aid"]], dim=-1))}
        vectors = self.model.vectors(ent)
        if self.split:
            model = cast(DeepMatchingModel, self.model)
            du, de, _ = model.encoder.pair_dims
            entity = torch.cat([ent["ent_uee"], ent["ent_aid"]], dim=-1)  # (n, De)
            bb = cast(Backbone, model.backbone)
            ent["ent_first_shared"] = entity @ bb.shared.net.first.linear.weight[:, du : du + de].t()  # (n, h1)
            ent["ent_first_domain"] = torch.einsum("ei,kio->eko", entity, bb.specific.net.first.weight[:, du : du + de])
        return (*(ent[n] for n in self.names), vectors)


def bag_embedding(m: CategoricalEmbedding, codes: Tensor) -> Tensor:
    """``CategoricalEmbedding.forward`` in a form the ONNX exporter gets right: (N, columns) -> (N, cols * dim).

    The module mean-pools a multi-value bag with ``index_add_`` along dim 1, which the TorchScript exporter
    turns into a graph that gives wrong values (checked: 0.24 max abs difference on the module's own
    example). Here the bags are summed with a constant (columns, features) one-hot matrix instead: same
    arithmetic, plain MatMul in the graph.
    """
    if m.cols == 0:
        return codes[:, :0].to(torch.float32)
    e = m.table(codes.long() + m.offsets)  # (N, columns, dim)
    if not m.multi:
        return e.flatten(1)
    onehot = torch.nn.functional.one_hot(m.bags, m.cols).to(e.dtype)  # (columns, cols): column -> its feature
    single = (onehot.sum(dim=0) == 1)[m.bags]  # (columns,): a single-value column always counts
    present = torch.where(single, torch.ones_like(codes, dtype=e.dtype), (codes != 0).to(e.dtype))  # (N, columns)
    summed = torch.einsum("ncd,cb->nbd", e * present.unsqueeze(-1), onehot)  # (N, cols, dim)
    count = present @ onehot  # (N, cols)
    return (summed / count.clamp(min=1.0).unsqueeze(-1)).flatten(1)


def cold_id_embedding(aid: np.ndarray, entity_type: np.ndarray, num_types: int) -> np.ndarray:
    """(T, d): per entity type, the mean trained id embedding of that type (all entities' mean if none)."""
    overall = aid.mean(axis=0) if aid.shape[0] else np.zeros(aid.shape[1], np.float32)
    out = np.tile(overall, (num_types, 1)).astype(np.float32)
    for t in range(num_types):
        sel = entity_type == t
        if sel.any():
            out[t] = aid[sel].mean(axis=0)
    return out


def check_entity_encoder(path: Path, feats: dict[str, np.ndarray], want: dict[str, np.ndarray], *,
                         rows: np.ndarray, batch: int = 4096) -> float:
    """Max |entity_encoder.onnx(features of ``rows``) - the bundle's own tensors of ``rows``| over every output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    in_names = {i.name for i in sess.get_inputs()}  # the exporter drops unused inputs (no categorical columns)
    out_names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    for start in range(0, rows.size, batch):
        part = rows[start : start + batch]
        got = sess.run(out_names, {n: v[part] for n, v in feats.items() if n in in_names})
        for name, g in zip(out_names, got, strict=True):
            worst = max(worst, float(np.abs(g - want[name][part]).max()))
    return worst


@torch.no_grad()
def entity_tensors(
    model: MatchingModel, num_entities: int, batch: int = 8192, device: torch.device | None = None
) -> dict[str, np.ndarray]:
    """Every entity's scorer inputs, computed once: name -> (E, ...) float32."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in model.entity_tensor_names}
    for start in range(0, num_entities, batch):
        rows = torch.arange(start, min(start + batch, num_entities), device=device)
        out = model.entity(rows)
        for n in parts:
            parts[n].append(out[n].cpu().numpy().astype(np.float32))
    return {n: np.concatenate(v) for n, v in parts.items()}


def _vector_space(kind: str) -> str:
    if kind == "two-tower":
        return (
            "the entity tower output (ent_vec): the two-tower score is its inner product with user_repr, "
            "so the graph is built on the very vectors that are scored"
        )
    return (
        "[E_uee, E_aid] (ad network output and id embedding): exactly the entity-side input of the pair scorer, "
        "so entities close in L2 receive close scores from the (Lipschitz) scorer for every user and domain, "
        "which is what NANN-style graph search needs; the FGSM option (backbone-*-adv) trains the scorer to be "
        "smooth in this space"
    )


def _export_onnx(module: nn.Module, args: tuple[Tensor, ...], path: Path, *, inputs: list[str], outputs: list[str],
                 dynamic: dict[str, dict[int, str]], opset: int) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings are noise here
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )


def _parity_inputs(ds: Dataset, model: MatchingModel, rng: np.random.Generator, n_users: int) -> list[dict[str, np.ndarray]]:
    """Random users (random codes, numerics, padded sequences) and real users with their serving sequence."""
    schema = ds.schema
    L = schema.max_seq_len
    E = len(ds.entities)
    seqs = serving_sequences(ds)
    test_users = np.unique(np.asarray(ds.interactions.user)[np.asarray(ds.interactions.split) == TEST])
    real = rng.choice(test_users if test_users.size else np.arange(len(ds.users)), size=min(n_users, len(ds.users)), replace=False)
    out: list[dict[str, np.ndarray]] = []
    for i in range(n_users):
        cat = np.array([[rng.integers(0, c.cardinality) for c in schema.user_categorical]], dtype=np.int64)
        num = rng.standard_normal((1, len(schema.user_numeric))).astype(np.float32)
        n_hist = int(rng.integers(0, L + 1)) if i else 0  # the first one has an empty history
        seq = np.full((1, L), -1, dtype=np.int64)
        if n_hist:
            seq[0, L - n_hist :] = rng.integers(0, E, size=n_hist)
        out.append({"user_cat": cat.reshape(1, -1), "user_num": num, "seq": seq})
    for u in real:
        out.append({
            "user_cat": np.asarray(ds.users.cat[u : u + 1], dtype=np.int64),
            "user_num": np.asarray(ds.users.num[u : u + 1], dtype=np.float32),
            "seq": seqs[u : u + 1].astype(np.int64),
        })
    return out


def check_parity(
    model: MatchingModel, ds: Dataset, user_path: Path, scorer_path: Path, ents: dict[str, np.ndarray], *,
    users: int, candidates: int, seed: int = 0, scorer_inputs: list[str] | None = None,
) -> float:
    """Max |onnxruntime - PyTorch| over user outputs and scores, every domain, random and real inputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    u_sess = ort.InferenceSession(str(user_path), opts, providers=["CPUExecutionProvider"])
    s_sess = ort.InferenceSession(str(scorer_path), opts, providers=["CPUExecutionProvider"])
    u_inputs = {i.name for i in u_sess.get_inputs()}
    rng = np.random.default_rng(seed)
    E = len(ds.entities)
    worst = 0.0
    with torch.no_grad():
        for feed in _parity_inputs(ds, model, rng, users):
            for k in range(ds.schema.num_domains):
                dom = np.array([k], dtype=np.int64)
                # the exporter drops inputs a graph does not use (user_cat with no categorical user features)
                u_feed = {k: v for k, v in {**feed, "domain": dom}.items() if k in u_inputs}
                onnx_user = u_sess.run(list(model.user_output_names), u_feed)
                t_in = [torch.from_numpy(np.array(feed[n])) for n in ("user_cat", "user_num", "seq")]
                t_user = model.user(t_in[0], t_in[1], t_in[2], torch.from_numpy(dom))
                for name, got in zip(model.user_output_names, onnx_user, strict=True):
                    worst = max(worst, float(np.abs(got - t_user[name].numpy()).max()))
                rows = rng.choice(E, size=min(candidates, E), replace=False)
                ent = {n: ents[n][rows] for n in model.entity_tensor_names}
                feed_ent = {n: ents[n][rows] for n in (scorer_inputs or model.entity_tensor_names)}
                s_feed = {**dict(zip(model.user_output_names, onnx_user, strict=True)), "domain": dom, **feed_ent}
                (got,) = s_sess.run(["score"], s_feed)
                want, _ = model.score(t_user, {n: torch.from_numpy(v) for n, v in ent.items()}, torch.from_numpy(dom))
                if got.shape != (rows.shape[0],):
                    raise ExportError(f"{scorer_path}: score has shape {got.shape}, expected ({rows.shape[0]},)")
                worst = max(worst, float(np.abs(got - want[0].numpy()).max()))
    return worst


def _export_entity_encoder(
    cfg: ExportConfig, model: MatchingModel, ds: Dataset, ents: dict[str, np.ndarray], vectors: np.ndarray,
    ent_names: list[str], tmp: Path,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Write ``entity_encoder.onnx``, check it reproduces the bundle's entity tensors; manifest section + arrays.

    Returns the manifest's ``entity_encoder`` section and the id-embedding arrays to save with the others
    (the cold-start rows, and the id embedding itself when no entity tensor already holds it).
    """
    import onnx

    E = len(ds.entities)
    aid = model.encoder.emb.aid.weight.detach().numpy().astype(np.float32)  # (E, d)
    etype = np.asarray(ds.entities.entity_type, dtype=np.int64)
    feats: dict[str, np.ndarray] = {
        "ent_cat": np.asarray(ds.entities.cat, dtype=np.int64),
        "ent_num": np.asarray(ds.entities.num, dtype=np.float32),
        "ent_type": etype,
        "id_embedding": aid,
    }
    path = tmp / ENTITY_ENCODER_FILE
    n0 = min(E, 3)
    example = tuple(torch.from_numpy(np.array(feats[n][:n0])) for n in ENTITY_ENCODER_INPUTS)
    outputs = [*ent_names, "vectors"]
    _export_onnx(
        EntityEncoderGraph(model, ent_names, cfg.first_layer_split), example, path,
        inputs=list(ENTITY_ENCODER_INPUTS), outputs=outputs,
        dynamic={n: {0: "batch"} for n in [*ENTITY_ENCODER_INPUTS, *outputs]}, opset=cfg.opset,
    )
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker failed: {str(exc).splitlines()[0]}") from None
    rng = np.random.default_rng(2)
    rows = np.unique(np.concatenate([[0, E - 1], rng.choice(E, size=min(cfg.parity_entities, E), replace=False)]))
    worst = check_entity_encoder(path, feats, {**ents, "vectors": vectors}, rows=rows.astype(np.int64))
    if not worst <= cfg.atol:
        raise ExportError(f"entity encoder and the bundle's entity tensors disagree: max abs difference {worst:.3g} > {cfg.atol:g}")
    arrays = {COLD_ID_FILE: cold_id_embedding(aid, etype, ds.schema.num_entity_types)}
    if "ent_aid" in ent_names:
        id_file = "entities/ent_aid.npy"  # the id embedding already is an entity tensor: not stored twice
    else:
        id_file = "entities/id_embedding.npy"
        arrays[id_file] = aid
    section = {
        "file": ENTITY_ENCODER_FILE,
        "inputs": list(ENTITY_ENCODER_INPUTS),
        "outputs": outputs,
        "id_embedding": id_file,
        "cold_id_embedding": COLD_ID_FILE,
        "parity_max_abs_diff": worst,
        "parity_rows": int(rows.size),
    }
    return section, arrays


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the bundle for ``cfg.run`` to ``cfg.out`` (atomically); returns a small report."""
    import onnx

    loaded = load_run(cfg.run, data=cfg.data)
    model, ds = loaded.model, loaded.dataset
    model.eval()
    schema = ds.schema
    E = len(ds.entities)
    ents = entity_tensors(model, E, cfg.entity_batch)
    with torch.no_grad():
        vectors = model.vectors({n: torch.from_numpy(v) for n, v in ents.items()}).numpy().astype(np.float32)
    L, cu, cn = schema.max_seq_len, len(schema.user_categorical), len(schema.user_numeric)
    example_user = (
        torch.zeros(1, cu, dtype=torch.long), torch.zeros(1, cn), torch.full((1, L), -1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
    )
    with torch.no_grad():
        u_out = model.user(*example_user)
    user_names = list(model.user_output_names)
    ent_names = list(model.entity_tensor_names)
    scorer_module: nn.Module = PairScorerGraph(model, schema.num_domains)
    if cfg.first_layer_split:
        from model.config import Architecture

        if not isinstance(model, DeepMatchingModel) or model.arch is not Architecture.BACKBONE:
            raise ExportError(f"--first-layer-split needs a backbone* method, not {loaded.cfg.method!r}")
        ents.update(SplitBackboneScorer.precompute(model, ents))
        ent_names = list(SplitBackboneScorer.ENTITY_INPUTS)
        scorer_module = SplitBackboneScorer(model, schema.num_domains)
    example_ent = tuple(torch.from_numpy(ents[n][:3]) for n in ent_names)
    scorer_args = (*(u_out[n] for n in user_names), torch.zeros(1, dtype=torch.long), *example_ent)
    with atomic_directory(Path(cfg.out), marker="manifest.json") as tmp:  # never replaces a foreign directory
        (tmp / "entities").mkdir()
        user_path, scorer_path = tmp / "user_encoder.onnx", tmp / "pair_scorer.onnx"
        _export_onnx(
            UserEncoderGraph(model), example_user, user_path,
            inputs=["user_cat", "user_num", "seq", "domain"], outputs=user_names, dynamic={}, opset=cfg.opset,
        )
        _export_onnx(
            scorer_module, scorer_args, scorer_path,
            inputs=[*user_names, "domain", *ent_names], outputs=["score"],
            dynamic={**{n: {0: "batch"} for n in ent_names}, "score": {0: "batch"}}, opset=cfg.opset,
        )
        for path in (user_path, scorer_path):
            try:
                onnx.checker.check_model(str(path))
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"{path.name}: onnx.checker failed: {str(exc).splitlines()[0]}") from None
        worst = check_parity(
            model, ds, user_path, scorer_path, ents, users=cfg.parity_users, candidates=cfg.parity_candidates,
            scorer_inputs=ent_names,
        )
        if not worst <= cfg.atol:
            raise ExportError(f"ONNX and PyTorch disagree: max abs difference {worst:.3g} > {cfg.atol:g}")
        batched: dict[str, Any] | None = None
        if isinstance(model, DeepMatchingModel) and not cfg.first_layer_split:
            # The scorer for merged concurrent requests (service.scoring.batching.BatchingScorer): U users x C own candidates.
            batched_path = tmp / "pair_scorer_batched.onnx"
            b_args = (*(u_out[n].expand(2, *u_out[n].shape[1:]) for n in user_names), torch.zeros(2, dtype=torch.long),
                      *(t.unsqueeze(0).expand(2, *t.shape) for t in example_ent))
            _export_onnx(
                BatchedPairScorerGraph(model, schema.num_domains), b_args, batched_path,
                inputs=[*user_names, "domain", *ent_names], outputs=["score"],
                dynamic={**{n: {0: "users"} for n in [*user_names, "domain"]},
                         **{n: {0: "users", 1: "candidates"} for n in ent_names}, "score": {0: "users", 1: "candidates"}},
                opset=cfg.opset,
            )
            b_worst = check_batched_parity(
                batched_path, scorer_path, {n: u_out[n].numpy() for n in user_names},
                {n: ents[n] for n in ent_names}, schema.num_domains,
            )
            if not b_worst <= cfg.atol:
                raise ExportError(f"batched and per-user pair scorers disagree: max abs difference {b_worst:.3g} > {cfg.atol:g}")
            batched = {"file": "pair_scorer_batched.onnx", "parity_max_abs_diff": b_worst}
        encoder, id_arrays = _export_entity_encoder(cfg, model, ds, ents, vectors, ent_names, tmp)
        arrays: dict[str, np.ndarray] = {
            **id_arrays,
            "entities/external_id.npy": np.asarray(ds.entities.external_id).astype(str),
            "entities/entity_type.npy": np.asarray(ds.entities.entity_type, dtype=np.int16),
            "entities/domain_mask.npy": np.asarray(ds.entities.domain_mask, dtype=np.uint64),
            "entities/vectors.npy": vectors,
            **{f"entities/{n}.npy": ents[n] for n in ent_names},
        }
        for rel, arr in arrays.items():
            np.save(tmp / rel, np.ascontiguousarray(arr), allow_pickle=False)
        schema.save(tmp / "schema.json")
        files = {
            rel: {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
            for rel in ["schema.json", "user_encoder.onnx", "pair_scorer.onnx", ENTITY_ENCODER_FILE,
                        *(["pair_scorer_batched.onnx"] if batched else []), *arrays]
        }
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode())
        manifest = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "bundle_version": f"{now.strftime('%Y%m%dT%H%M%SZ')}-{digest.hexdigest()[:8]}",
            "created": now.isoformat().replace("+00:00", "Z"),
            "method": loaded.cfg.method,
            "kind": model.kind,
            "schema_fingerprint": schema.fingerprint(),
            "domains": list(schema.domains),
            "entity_types": list(schema.entity_types),
            "num_entities": E,
            "opset": cfg.opset,
            "user_outputs": user_names,
            "user_output_shapes": {n: list(u_out[n].shape) for n in user_names},
            "entity_tensors": {
                n: {"file": f"entities/{n}.npy", "shape": list(ents[n].shape), "dtype": "float32"} for n in ent_names
            },
            "vector_space": {"file": "entities/vectors.npy", "dim": int(vectors.shape[1]), "what": _vector_space(model.kind)},
            "precision": "float32",
            "first_layer_split": cfg.first_layer_split,
            # absent for two-tower and first-layer-split bundles: those serve concurrent requests one call each
            **({"batched_scorer": batched} if batched else {}),
            "parity_max_abs_diff": worst,
            "entity_encoder": encoder,
            "training": {"run": str(Path(cfg.run).resolve()), "steps": int(loaded.state.get("step", 0))},
            "files": files,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        # mkdtemp/mkstemp create owner-only files; serving replicas may run as another user
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    return {"method": loaded.cfg.method, "kind": model.kind, "num_entities": E, "max_abs_diff": worst,
            "bundle_version": manifest["bundle_version"]}
