"""A corrupted bundle is refused at load, at reload (the old one keeps serving), by `serve` and by `index build`.

Each corruption keeps the manifest's checksums consistent (they are recomputed), as a bad build or a
hand edit would: the structure checks must catch what the checksums cannot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.checks import check_containment, manifest_paths, onnx_external_locations
from contracts.manifest import BundleError
from service.app import create_app
from service.config import Settings
from tests.fixtures.fake_bundle import make_fake_bundle
from unimatch.cli import main

AUTH = {"Authorization": "Bearer tok"}
REQ = {"user_id": "user-0007", "domain": "domain_0", "k": 10}


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_bundle(tmp_path_factory.mktemp("bv") / "bundle", num_entities=600, dim=8)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(bundle: Path) -> None:
    """Recompute every checksum in the manifest, as a corrupting build would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for section in (manifest.get("files", {}), manifest.get("graph", {}).get("files", {})):
        for rel, meta in section.items():
            meta["sha256"] = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
            meta["bytes"] = (bundle / rel).stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _edit(bundle: Path, rel: str, change) -> None:
    arr = np.load(bundle / rel).copy()
    change(arr)
    np.save(bundle / rel, arr, allow_pickle=False)
    _rehash(bundle)


def _corrupt_neighbours(bundle: Path) -> Path:
    n = int(np.load(bundle / "graph/levels.npy").shape[0])

    def change(nbr: np.ndarray) -> None:
        nbr[len(nbr) // 2] = n + 7  # one id out of range, deep in layer 0 where small-k searches never go

    _edit(bundle, "graph/layer0_neighbors.npy", change)
    return bundle


# ---- graph structure ---------------------------------------------------------------------------
def test_neighbour_id_out_of_range_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    d = _corrupt_neighbours(_copy(small_bundle, tmp_path / "b"))
    with pytest.raises(BundleError, match=r"layer0_neighbors.npy: neighbour id 607 at position \d+ outside \[0, 600\)"):
        load_bundle(d)


def test_negative_neighbour_id_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    d = _copy(small_bundle, tmp_path / "b")
    _edit(d, "graph/layer1_neighbors.npy", lambda a: a.__setitem__(0, -1))
    with pytest.raises(BundleError, match="neighbour id -1"):
        load_bundle(d)


def test_offsets_must_be_monotone(small_bundle: Path, tmp_path: Path) -> None:
    d = _copy(small_bundle, tmp_path / "b")

    def change(off: np.ndarray) -> None:
        off[5], off[6] = off[6], off[5] - 1  # still starts at 0 and ends at nnz

    _edit(d, "graph/layer0_offsets.npy", change)
    with pytest.raises(BundleError, match="offsets decrease at node 5"):
        load_bundle(d)


def test_levels_and_layers_must_agree(small_bundle: Path, tmp_path: Path) -> None:
    levels = np.load(small_bundle / "graph/levels.npy")
    on_layer1 = int(np.flatnonzero(levels >= 1)[0])
    d = _copy(small_bundle, tmp_path / "low")
    _edit(d, "graph/levels.npy", lambda a: a.__setitem__(on_layer1, 0))  # has a layer-1 row, says level 0
    with pytest.raises(BundleError, match=f"node {on_layer1} has level 0 but neighbours on layer 1"):
        load_bundle(d)
    d = _copy(small_bundle, tmp_path / "high")
    _edit(d, "graph/levels.npy", lambda a: a.__setitem__(0, 9))
    with pytest.raises(BundleError, match=r"levels must be in \[0, 4\)"):
        load_bundle(d)


def test_neighbour_below_the_layer_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    levels = np.load(small_bundle / "graph/levels.npy")
    level0 = int(np.flatnonzero(levels == 0)[0])
    d = _copy(small_bundle, tmp_path / "b")
    _edit(d, "graph/layer2_neighbors.npy", lambda a: a.__setitem__(0, level0))
    with pytest.raises(BundleError, match=f"neighbour {level0} .level 0. is not on layer 2"):
        load_bundle(d)


# ---- containment ---------------------------------------------------------------------------------
def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def test_manifest_paths_outside_the_bundle_are_refused(small_bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.load(small_bundle / "entities/ent_pop.npy"))
    for i, bad in enumerate(["../elsewhere.npy", str(outside), "entities/../../elsewhere.npy"]):
        d = _copy(small_bundle, tmp_path / f"b{i}")
        m = _manifest(d)
        m["entity_tensors"]["ent_pop"]["file"] = bad
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match="only plain paths inside the bundle"):
            load_bundle(d, verify_checksums=False)


def test_symlink_out_of_the_bundle_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    d = _copy(small_bundle, tmp_path / "b")
    outside = tmp_path / "ent_pop.npy"
    shutil.move(d / "entities/ent_pop.npy", outside)
    (d / "entities/ent_pop.npy").symlink_to(outside)
    with pytest.raises(BundleError, match="resolves outside the bundle|symlink out of the bundle"):
        load_bundle(d)
    with pytest.raises(BundleError, match="symlink out of the bundle"):  # checked without checksums too
        load_bundle(d, verify_checksums=False)
    # a link that stays inside is fine
    (d / "entities/ent_pop.npy").unlink()
    shutil.copy(outside, d / "entities/real_pop.npy")
    (d / "entities/ent_pop.npy").symlink_to("real_pop.npy")
    load_bundle(d)


def test_manifest_paths_are_collected_everywhere(small_bundle: Path) -> None:
    paths = set(manifest_paths(_manifest(small_bundle)))
    assert {"entities/ent_uee.npy", "entities/vectors.npy", "pair_scorer.onnx", "graph/layer3_neighbors.npy"} <= paths
    assert set(manifest_paths({"calibration": {"file": "x/../../y"}, "extra": [{"score_file": "z"}]})) == {"x/../../y", "z"}


def _onnx_with_external(path: Path, location: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto()
    weight.name, weight.data_type = "w", TensorProto.FLOAT
    weight.dims.extend([1])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    # the external tensor sits inside an If branch: subgraphs are walked too
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "b", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [weight])
    node = helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=False)


def test_onnx_external_data_must_stay_inside(small_bundle: Path, tmp_path: Path) -> None:
    d = _copy(small_bundle, tmp_path / "b")
    _onnx_with_external(d / "pair_scorer.onnx", "../../etc/secret.bin")
    assert onnx_external_locations(d / "pair_scorer.onnx") == ["../../etc/secret.bin", "../../etc/secret.bin"]
    _rehash(d)
    with pytest.raises(BundleError, match="pair_scorer.onnx: external data '../../etc/secret.bin'"):
        load_bundle(d)
    _onnx_with_external(d / "pair_scorer.onnx", "weights.bin")
    check_containment(d, _manifest(d), ["pair_scorer.onnx"])  # inside: accepted


def test_the_real_onnx_files_have_no_external_data_and_truncation_is_caught(small_bundle: Path, tmp_path: Path) -> None:
    assert onnx_external_locations(small_bundle / "pair_scorer.onnx") == []
    data = (small_bundle / "pair_scorer.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) - 37])
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        onnx_external_locations(cut)


# ---- reload, serve, index build ------------------------------------------------------------------
async def _with_app(settings: Settings, body):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://unimatch") as client:
            return await body(client)


def test_reload_refuses_a_corrupted_graph_and_the_old_keeps_serving(
    bundle_dir: Path, bundle2_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    target = _corrupt_neighbours(_copy(bundle2_dir, tmp_path / "bad"))

    async def body(client: httpx.AsyncClient):
        r = await client.post("/admin/reload", params={"wait": "true"}, json={"bundle": str(target)}, headers=AUTH)
        wide = await client.post("/match", json={**REQ, "k": 1000})
        return r, wide

    r, wide = asyncio.run(_with_app(Settings(bundle=bundle_dir, data=dataset_dir, admin_token="tok"), body))
    assert r.status_code == 422 and "neighbour id" in r.json()["error"]["message"], r.text
    assert wide.status_code == 200 and wide.json()["bundle_version"].endswith("fake0000")


def test_warm_up_runs_the_largest_k_and_refuses_what_fails_there(
    bundle_dir: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle that fails only on wide searches is refused at load (the engine's own warm-up uses k=10)."""
    from service import lifespan
    from service.engine import MatchEngine

    seen: list[int] = []
    real = MatchEngine.match

    def match(self, user, domain, k, **kw):
        seen.append(k)
        if k > 500:
            raise IndexError("index 2007 is out of bounds for axis 0 with size 2000")
        return real(self, user, domain, k, **kw)

    monkeypatch.setattr(MatchEngine, "match", match)
    with pytest.raises(IndexError):
        lifespan.build_serving(bundle_dir, Settings(bundle=bundle_dir, data=dataset_dir, max_k=800))
    assert max(seen) == 800
    seen.clear()
    lifespan.build_serving(bundle_dir, Settings(bundle=bundle_dir, data=dataset_dir, max_k=400))
    assert max(seen) == 400


def test_serve_refuses_a_corrupted_bundle_in_one_line(small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _corrupt_neighbours(_copy(small_bundle, tmp_path / "b"))
    assert main(["serve", "--bundle", str(d), "--port", "9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neighbour id" in err, err
    d2 = _copy(small_bundle, tmp_path / "b2")
    (d2 / "pair_scorer.onnx").write_bytes((d2 / "pair_scorer.onnx").read_bytes()[:100])
    assert main(["serve", "--bundle", str(d2), "--port", "9"]) == 2
    assert "pair_scorer.onnx" in capsys.readouterr().err


def test_index_build_verifies_checksums_first(small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy(small_bundle, tmp_path / "b")
    data = (d / "pair_scorer.onnx").read_bytes()
    (d / "pair_scorer.onnx").write_bytes(data[: len(data) // 2])
    before = (d / "manifest.json").read_text()
    assert main(["index", "build", "--bundle", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pair_scorer.onnx checksum mismatch" in err and "truncated" in err, err
    assert (d / "manifest.json").read_text() == before  # nothing written
