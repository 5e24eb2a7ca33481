"""Export to a serving bundle (docs/bundle-format.md), ONNX parity, Recall-all evaluation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from contracts.io import sha256_file
from model.checkpoint import CheckpointError, load_run
from model.data.synth import SynthConfig, generate
from model.evaluate import EvalConfig, evaluate, markdown_table
from model.export import ExportConfig, export
from model.train import train
from unimatch.cli import main

from .test_model_train import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    return generate(SynthConfig(num_users=60, num_entities=300, num_interactions=3000, max_seq_len=10), out)


@pytest.fixture(scope="module")
def deep_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tiny_config(data, tmp_path_factory.mktemp("runs") / "deep", "backbone-rrl", max_steps=3))


@pytest.fixture(scope="module")
def deep_bundle(deep_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "deep"
    export(ExportConfig(run=deep_run, out=out, parity_users=2, parity_candidates=31))
    return out


def _sessions(bundle: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    return (
        ort.InferenceSession(str(bundle / "user_encoder.onnx"), providers=["CPUExecutionProvider"]),
        ort.InferenceSession(str(bundle / "pair_scorer.onnx"), providers=["CPUExecutionProvider"]),
    )


def test_bundle_layout_and_manifest(deep_bundle: Path, data: Path) -> None:
    m = json.loads((deep_bundle / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["kind"] == "deep" and m["method"] == "backbone-rrl"
    schema = json.loads((data / "schema.json").read_text())
    assert m["domains"] == schema["domains"] and m["entity_types"] == schema["entity_types"]
    assert m["schema_fingerprint"] == json.loads((data / "dataset.json").read_text())["schema_fingerprint"]
    assert m["num_entities"] == 300 and m["opset"] == 17 and m["precision"] == "float32"
    assert m["vector_space"]["file"] == "entities/vectors.npy" and m["vector_space"]["what"]
    for rel, info in m["files"].items():
        assert sha256_file(deep_bundle / rel) == info["sha256"], rel
    for rel in ("user_encoder.onnx", "pair_scorer.onnx", "schema.json", "entities/external_id.npy",
                "entities/entity_type.npy", "entities/domain_mask.npy", "entities/vectors.npy"):
        assert rel in m["files"]
    ids = np.load(deep_bundle / "entities/external_id.npy", mmap_mode="r", allow_pickle=False)
    assert ids.shape == (300,) and ids.dtype.kind == "U"
    assert np.load(deep_bundle / "entities/entity_type.npy").dtype == np.int16
    assert np.load(deep_bundle / "entities/domain_mask.npy").dtype == np.uint64
    vec = np.load(deep_bundle / "entities/vectors.npy", mmap_mode="r")
    assert vec.dtype == np.float32 and vec.shape == (300, m["vector_space"]["dim"])
    for name, info in m["entity_tensors"].items():
        arr = np.load(deep_bundle / info["file"], mmap_mode="r")
        assert list(arr.shape) == info["shape"] and arr.dtype == np.float32, name
    assert m["parity_max_abs_diff"] <= 1e-4


def test_onnx_matches_pytorch_for_every_domain_and_batch_size(deep_bundle: Path, deep_run: Path) -> None:
    m = json.loads((deep_bundle / "manifest.json").read_text())
    user_sess, scorer = _sessions(deep_bundle)
    assert [i.name for i in user_sess.get_inputs()] == ["user_cat", "user_num", "seq", "domain"]
    model = load_run(deep_run).model
    ents = {n: np.load(deep_bundle / info["file"]) for n, info in m["entity_tensors"].items()}
    feed = {
        "user_cat": np.array([[1, 2, 3]], dtype=np.int64),
        "user_num": np.array([[0.5, -1.0]], dtype=np.float32),
        "seq": np.array([[-1] * 6 + [4, 8, 15, 16]], dtype=np.int64),
    }
    per_domain = []
    for k in range(len(m["domains"])):
        dom = np.array([k], dtype=np.int64)
        outs = user_sess.run(m["user_outputs"], {**feed, "domain": dom})
        for batch in (1, 7, 300):
            rows = np.arange(batch)
            (score,) = scorer.run(["score"], {**dict(zip(m["user_outputs"], outs, strict=True)), "domain": dom,
                                             **{n: v[rows] for n, v in ents.items()}})
            assert score.shape == (batch,)
            with torch.no_grad():
                user = model.user(*(torch.from_numpy(feed[n]) for n in ("user_cat", "user_num", "seq")), torch.from_numpy(dom))
                want, _ = model.score(user, {n: torch.from_numpy(v[rows]) for n, v in ents.items()}, torch.from_numpy(dom))
            np.testing.assert_allclose(score, want[0].numpy(), atol=1e-4)
        per_domain.append(score)
    # one graph, the domain's expert and tower selected inside it
    assert not np.allclose(per_domain[0], per_domain[1])


def test_two_tower_bundle_scores_the_inner_product(data: Path, tmp_path: Path) -> None:
    run = train(tiny_config(data, tmp_path / "tt", "two-tower", max_steps=2))
    bundle = tmp_path / "bundle"
    export(ExportConfig(run=run, out=bundle, parity_users=1, parity_candidates=9))
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["kind"] == "two-tower" and m["user_outputs"] == ["user_repr"]
    user_sess, scorer = _sessions(bundle)
    vec = np.load(bundle / "entities/vectors.npy")
    (u,) = user_sess.run(["user_repr"], {"user_cat": np.zeros((1, 3), np.int64), "user_num": np.zeros((1, 2), np.float32),
                                         "seq": np.full((1, 10), -1, np.int64), "domain": np.array([2], np.int64)})
    (score,) = scorer.run(["score"], {"user_repr": u, "domain": np.array([2], np.int64),
                                      **{n: np.load(bundle / i["file"])[:20] for n, i in m["entity_tensors"].items()}})
    np.testing.assert_allclose(score, vec[:20] @ u[0], rtol=1e-5, atol=1e-5)


def test_export_refuses_a_dataset_with_another_schema(deep_run: Path, tmp_path: Path) -> None:
    other = generate(SynthConfig(num_users=30, num_entities=200, num_interactions=1000, max_seq_len=10, num_domains=2), tmp_path / "d2")
    with pytest.raises(CheckpointError, match="schema"):
        export(ExportConfig(run=deep_run, out=tmp_path / "b", data=other))
    assert not (tmp_path / "b").exists()
    assert main(["export", "--run", str(deep_run), "--out", str(tmp_path / "b"), "--data", str(other)]) == 2


def test_recall_all_json_and_table(deep_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = evaluate(EvalConfig(run=deep_run, ns=(5, 50), max_users=20, json=out, progress=False))
    saved = json.loads(out.read_text())
    assert set(saved["recall_all"]) == {"domain_0", "domain_1", "domain_2", "domain_3", "average"}
    for vals in saved["recall_all"].values():
        assert set(vals) == {"5", "50"} and 0.0 <= vals["5"] <= vals["50"] <= 1.0
    assert result["num_users"] == 20
    assert "| **average over domains** |" in markdown_table(result)


def test_recall_all_at_full_catalogue_is_one(deep_run: Path) -> None:
    result = evaluate(EvalConfig(run=deep_run, ns=(300,), max_users=5, progress=False))
    assert all(v["300"] == pytest.approx(1.0) for v in result["recall_all"].values())


def test_cli_train_eval_export(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--method", "dnn", "--out", str(run), "--max-steps", "2",
                 "--batch-size", "16", "--negatives", "8", "--embed-dim", "8", "--no-progress"]) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "run.json").is_file()
    assert main(["eval", "--run", str(run), "--n", "10", "--users", "5", "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert "average" in json.loads((tmp_path / "e.json").read_text())["recall_all"]
    assert main(["eval", "--run", str(run), "--n", "ten"]) == 2
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dnn", "cross-stitch", "dselect-k"])
def test_baselines_export_with_the_same_signature(method: str, data: Path, tmp_path: Path) -> None:
    run = train(tiny_config(data, tmp_path / method, method, max_steps=1))
    report = export(ExportConfig(run=run, out=tmp_path / "b", parity_users=1, parity_candidates=5))
    assert report["max_abs_diff"] <= 1e-4
    _, scorer = _sessions(tmp_path / "b")
    assert "domain" in [i.name for i in scorer.get_inputs()]


def test_first_layer_split_scores_the_same_as_the_plain_scorer(deep_run: Path, deep_bundle: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    export(ExportConfig(run=deep_run, out=split, first_layer_split=True, parity_users=1, parity_candidates=11))
    ms = json.loads((split / "manifest.json").read_text())
    assert ms["first_layer_split"] is True
    assert list(ms["entity_tensors"]) == ["ent_aid", "ent_first_shared", "ent_first_domain"]
    assert ms["entity_tensors"]["ent_first_domain"]["shape"] == [300, 4, 16]
    mp_ = json.loads((deep_bundle / "manifest.json").read_text())
    feed = {"user_cat": np.array([[2, 1, 0]], np.int64), "user_num": np.array([[1.0, 0.0]], np.float32),
            "seq": np.array([[-1] * 5 + [1, 2, 3, 4, 5]], np.int64)}
    for k in (0, 3):
        dom = np.array([k], np.int64)
        scores = []
        for bundle, m in ((deep_bundle, mp_), (split, ms)):
            user_sess, scorer = _sessions(bundle)
            outs = user_sess.run(m["user_outputs"], {**feed, "domain": dom})
            ents = {n: np.load(bundle / i["file"])[:50] for n, i in m["entity_tensors"].items()}
            scores.append(scorer.run(["score"], {**dict(zip(m["user_outputs"], outs, strict=True)), "domain": dom, **ents})[0])
        np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)


def test_first_layer_split_needs_the_backbone(data: Path, tmp_path: Path) -> None:
    run = train(tiny_config(data, tmp_path / "dnn", "dnn", max_steps=1))
    with pytest.raises(ValueError, match="first-layer-split"):
        export(ExportConfig(run=run, out=tmp_path / "b", first_layer_split=True))


def test_batched_scorer_scores_each_user_against_its_own_candidates(deep_bundle: Path) -> None:
    manifest = json.loads((deep_bundle / "manifest.json").read_text())
    assert manifest["batched_scorer"]["file"] == "pair_scorer_batched.onnx"
    assert manifest["batched_scorer"]["parity_max_abs_diff"] <= 1e-4
    assert "pair_scorer_batched.onnx" in manifest["files"]
    u_sess, s_sess = _sessions(deep_bundle)
    b_sess = ort.InferenceSession(str(deep_bundle / "pair_scorer_batched.onnx"), providers=["CPUExecutionProvider"])
    ents = {n: np.load(deep_bundle / spec["file"]) for n, spec in manifest["entity_tensors"].items()}
    schema_len = manifest["user_output_shapes"]["seq_keys"][1]
    rng = np.random.default_rng(3)
    users, doms = [], np.array([1, 0], dtype=np.int64)
    for i, d in enumerate(doms):
        seq = np.full((1, schema_len), -1, dtype=np.int64)
        seq[0, -2 - i :] = rng.integers(0, len(ents["ent_aid"]), size=2 + i)
        feed = {i.name: np.zeros([1, *i.shape[1:]], dtype=np.int64 if "int" in i.type else np.float32) for i in u_sess.get_inputs()}
        feed.update(seq=seq, domain=np.array([d]))
        users.append(dict(zip(manifest["user_outputs"], u_sess.run(manifest["user_outputs"], feed), strict=True)))
    rows = rng.integers(0, len(ents["ent_aid"]), size=(2, 13))
    feed = {n: np.concatenate([u[n] for u in users]) for n in manifest["user_outputs"]}
    (got,) = b_sess.run(["score"], {**feed, "domain": doms, **{n: t[rows] for n, t in ents.items()}})
    assert got.shape == (2, 13)
    for i in range(2):
        (want,) = s_sess.run(["score"], {**users[i], "domain": doms[i : i + 1], **{n: t[rows[i]] for n, t in ents.items()}})
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_serving_batches_concurrent_requests_on_an_exported_bundle(deep_bundle: Path) -> None:
    """service.scoring.batching.BatchingScorer on a real export: merged calls of several users (different domains,
    different frontier sizes) give every request the scores it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from contracts.bundle import load_bundle
    from service.scoring.batching import BatchingScorer
    from service.scoring.host import CPU, HostGatherScorer

    bundle = load_bundle(deep_bundle)
    host = HostGatherScorer(bundle)
    batcher = BatchingScorer(bundle, provider=CPU)  # the GPU code path on host memory
    try:
        assert batcher.batched_file == "pair_scorer_batched.onnx"
        schema = bundle.schema
        rng = np.random.default_rng(5)
        work = []
        for i in range(8):
            seq = np.full(schema.max_seq_len, -1, dtype=np.int64)
            seq[-1 - i % 3 :] = rng.integers(0, bundle.num_entities, size=1 + i % 3)
            cat = np.zeros(len(schema.user_categorical), dtype=np.int64)
            num = rng.standard_normal(len(schema.user_numeric)).astype(np.float32)
            rows = rng.permutation(bundle.num_entities)[: 5 + 7 * i].astype(np.int64)
            work.append((cat, num, seq, i % schema.num_domains, rows))
        with ThreadPoolExecutor(max_workers=8) as pool:
            got = list(pool.map(lambda w: batcher.score(batcher.encode(*w[:4]), w[4]), work))
        for w, scores in zip(work, got, strict=True):
            np.testing.assert_allclose(scores, host.score(host.encode(*w[:4]), w[4]), rtol=1e-5, atol=1e-5)
        assert batcher.merged_steps >= 8 and batcher.calls <= batcher.merged_steps
    finally:
        batcher.close()


def _encode_all(bundle: Path, data: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the bundle's entity encoder on every entity's dataset features and its own id embedding."""
    m = json.loads((bundle / "manifest.json").read_text())
    enc = m["entity_encoder"]
    sess = ort.InferenceSession(str(bundle / enc["file"]), providers=["CPUExecutionProvider"])
    feed = {
        "ent_cat": np.load(data / "entities/cat.npy").astype(np.int64),
        "ent_num": np.load(data / "entities/num.npy").astype(np.float32),
        "ent_type": np.load(data / "entities/entity_type.npy").astype(np.int64),
        "id_embedding": np.load(bundle / enc["id_embedding"]),
    }
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return m, dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted}), strict=True))


@pytest.mark.parametrize("variant", ["deep", "split", "two-tower"])
def test_entity_encoder_reproduces_every_entity_tensor(variant: str, deep_run: Path, deep_bundle: Path, data: Path,
                                                      tmp_path: Path) -> None:
    bundle = deep_bundle
    if variant == "split":
        bundle = tmp_path / "split"
        export(ExportConfig(run=deep_run, out=bundle, first_layer_split=True, parity_users=1, parity_candidates=5))
    elif variant == "two-tower":
        run = train(tiny_config(data, tmp_path / "tt", "two-tower", max_steps=2))
        bundle = tmp_path / "tt-bundle"
        export(ExportConfig(run=run, out=bundle, parity_users=1, parity_candidates=5))
    m, got = _encode_all(bundle, data)
    enc = m["entity_encoder"]
    assert enc["outputs"] == [*m["entity_tensors"], "vectors"] and enc["parity_max_abs_diff"] <= 1e-4
    assert enc["file"] in m["files"] and enc["cold_id_embedding"] in m["files"] and enc["id_embedding"] in m["files"]
    for name, info in m["entity_tensors"].items():  # every row, not only the rows checked at export
        np.testing.assert_allclose(got[name], np.load(bundle / info["file"]), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(got["vectors"], np.load(bundle / "entities/vectors.npy"), atol=1e-4)
    # the cold-start id rows are the per-type means of the trained id embedding
    cold = np.load(bundle / enc["cold_id_embedding"])
    aid, etype = np.load(bundle / enc["id_embedding"]), np.load(data / "entities/entity_type.npy")
    assert cold.shape == (len(m["entity_types"]), aid.shape[1])
    for t in np.unique(etype):
        np.testing.assert_allclose(cold[t], aid[etype == t].mean(axis=0), atol=1e-6)


def test_export_refuses_an_entity_encoder_that_disagrees(deep_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import model.export as ex

    real = ex.check_entity_encoder
    monkeypatch.setattr(ex, "check_entity_encoder", lambda *a, **kw: real(*a, **kw) + 1.0)
    with pytest.raises(ex.ExportError, match="entity encoder"):
        export(ExportConfig(run=deep_run, out=tmp_path / "b", parity_users=1, parity_candidates=5))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("values", [[1, 3], [1, 1], [2, 1, 3]])
def test_bag_embedding_equals_the_module_in_torch_and_in_onnx(values: list[int], tmp_path: Path) -> None:
    """The entity encoder's pooling of multi-value bags: same as CategoricalEmbedding, and exported right."""
    import warnings

    from model.embeddings import CategoricalEmbedding
    from model.export import bag_embedding

    emb = CategoricalEmbedding([3, 5, 4][: len(values)], dim=2, values=values).eval()

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = emb

        def forward(self, codes: torch.Tensor) -> torch.Tensor:
            return bag_embedding(self.emb, codes)

    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 3, size=(7, sum(values))))
    codes[1] = 0  # an empty bag
    torch.testing.assert_close(Graph()(codes), emb(codes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Graph(), (codes[:3],), str(tmp_path / "g.onnx"), input_names=["c"], output_names=["o"],
                          dynamic_axes={"c": {0: "b"}, "o": {0: "b"}}, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"c": codes.numpy()})[0], emb(codes).detach().numpy(), atol=1e-6)
