"""The whole GPU check in one timed call: makes the bundle on the device, then measures (docs/gpu.md).

Run by ``benchmarks/gpu_device.sh`` on the lent machine (16 cores, one H200, torch/numpy/onnx/CPU
onnxruntime and nothing else; the carried ``.device-wheels/`` supply pydantic and hnswlib), or here
with ``--tiny --device cpu`` as a dry run of every stage at tiny sizes. Stages, each timed and each
skipped with a recorded reason when the time budget (``--budget-s``) cannot hold it:

1. ``data``: ``unimatch data synth --preset 1m`` (1M entities, 10M interactions), in process.
2. ``train_speed``: training examples/s per method x batch x variant (``bench_train.time_training``:
   today's layout in float32, shared in-batch negatives, + bf16 autocast, + background prefetch),
   torch on CUDA.
3. ``bundle``: a short training run (shared negatives, bf16, sqrt-scaled learning rate) and
   ``unimatch export`` of it: the ONNX bundle with its parity checks (onnxruntime CPU vs torch).
4. ``scorer``: pair scorer pairs/s per batch (1k-64k candidates of one user) in fp32/bf16/fp16,
   eager and as one CUDA graph per batch bucket, plus the batched scorer (U users x P own
   candidates), torch on CUDA (``benchmarks.torch_scorer``: the run's checkpoint rebuilt).
5. ``index``: ``unimatch index build`` with all cores (hnswlib built from the carried sdist, in the
   background from the end of stage 2 on).
6. ``search``: end-to-end queries/s at B = 1, 16, 64, 256 concurrent requests: today's per-request
   ``service.search.search`` with the GPU scorer (B threads), and the batched lockstep search through
   ``lockstep_qps`` when the service package provides it (else skipped with the reason).
7. ``compile``: the best variant again with ``torch.compile``, each config in a subprocess under a
   hard timeout (warm-up steps, which include compilation, are reported apart). Last, because
   compilation time is the least predictable part.

Results: ``OUT/gpu_device.json`` (every number, the commands, the host) and ``OUT/gpu_device.md``,
rewritten after every stage so that a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

class Budget:
    """Wall-clock budget of the whole call; stages ask before they start."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Report:
    """The JSON + markdown results under OUT, rewritten atomically after every stage."""

    def __init__(self, out: Path, res: dict[str, Any]) -> None:
        self.out = out
        self.res = res
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        for name, text in (("gpu_device.json", json.dumps(self.res, indent=2, default=str) + "\n"),
                           ("gpu_device.md", markdown(self.res))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def log(msg: str) -> None:
    print(f"[gpu_device {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage(report: Report, budget: Budget, name: str, need_s: float, fn: Callable[[], Any]) -> Any:
    """Run one stage if ``need_s`` seconds are left; record its result, time, or why it did not run."""
    res = report.res.setdefault("stages", {})
    if budget.left() < need_s:
        res[name] = {"status": f"skipped: {budget.left():.0f} s left of the budget, the stage needs ~{need_s:.0f} s"}
        log(f"{name}: {res[name]['status']}")
        report.save()
        return None
    log(f"{name}: start ({budget.left():.0f} s left)")
    t0 = time.perf_counter()
    try:
        value = fn()
        res[name] = {"status": "ok", "seconds": time.perf_counter() - t0}
        return value
    except Exception as exc:
        res[name] = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                     "seconds": time.perf_counter() - t0, "traceback": traceback.format_exc()[-3000:]}
        log(f"{name}: {res[name]['status']}")
        return None
    finally:
        log(f"{name}: {res[name]['status']} in {res[name].get('seconds', 0):.1f} s")
        report.save()


# ---- hnswlib: built from the carried source archive in the background ---------------------------
def start_hnswlib_build(sdist: Path, site: Path, logfile: Path) -> subprocess.Popen[bytes] | None:
    if importlib.util.find_spec("hnswlib") is not None:
        return None
    if not sdist.is_file():
        raise FileNotFoundError(f"hnswlib is not installed and {sdist} is missing (run benchmarks/device_wheels.sh)")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--no-cache-dir",
           "--no-compile", "--target", str(site), str(sdist)]
    log(f"building hnswlib in the background: {' '.join(cmd)}")
    return subprocess.Popen(cmd, stdout=logfile.open("wb"), stderr=subprocess.STDOUT)


def wait_hnswlib(proc: subprocess.Popen[bytes] | None, site: Path, logfile: Path, timeout: float) -> None:
    if proc is not None:
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"hnswlib build still running after {timeout:.0f} more s; stopped it") from None
        if rc:
            raise RuntimeError(f"hnswlib build failed (rc {rc}): {logfile.read_text()[-400:]}")
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    importlib.import_module("hnswlib")


# ---- stages -------------------------------------------------------------------------------------
def make_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from model.data.synth import generate, preset

    data = work / "data"
    if not (data / "dataset.json").is_file():
        generate(preset(args.preset, seed=0), data)
    return {"path": str(data), "preset": args.preset}


def train_speed(args: argparse.Namespace, work: Path, report: Report, budget: Budget, variants: list[str],
                batches: list[int], key: str, need_each: float) -> None:
    from benchmarks.bench_train import time_training

    runs = report.res.setdefault(key, [])
    for method in args.methods:
        for batch in batches:
            for variant in variants:
                if budget.left() < need_each:
                    runs.append({"method": method, "batch": batch, "variant": variant,
                                 "status": f"skipped: {budget.left():.0f} s left"})
                    continue
                rec = time_training(work / "data", method, batch, variant, steps=args.steps, warmup=args.warmup,
                                    device=args.device, shared_m=args.shared_m, negatives=64,
                                    max_pairs=args.max_pairs, work=work / "speed")
                runs.append(rec)
                eps = rec.get("examples_per_s")
                log(f"train {method} B={batch} {variant}: " + (f"{eps:,.0f} examples/s" if eps else rec["status"]))
                report.save()


def compiled_speed(args: argparse.Namespace, work: Path, report: Report, budget: Budget) -> None:
    """The best eager variant with torch.compile, one subprocess per config with a hard timeout, so
    a compilation that runs long costs its own number, not the report (written before and after)."""
    runs = report.res.setdefault("compile", [])
    variant = "shared+bf16+prefetch+compile"
    for method in args.methods:
        for batch in args.compile_batches:
            left = budget.left() - 10
            if left < (10 if args.tiny else 60):
                runs.append({"method": method, "batch": batch, "variant": variant,
                             "status": f"skipped: {budget.left():.0f} s left"})
                continue
            js = work / f"compile-{method}-{batch}.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "options", "--data", str(work / "data"),
                   "--methods", method, "--batches", str(batch), "--variants", variant, "--device", args.device,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--shared-m", str(args.shared_m),
                   "--max-pairs", str(args.max_pairs), "--json", str(js), "--work", str(work / "speed")]
            t0 = time.perf_counter()
            try:
                subprocess.run(cmd, check=True, timeout=left, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                rec = json.loads(js.read_text())["runs"][0]
            except subprocess.TimeoutExpired:
                rec = {"method": method, "batch": batch, "variant": variant,
                       "status": f"timed out after {left:.0f} s (compilation and steps)"}
            except subprocess.CalledProcessError as exc:
                tail = (exc.stdout or b"").decode(errors="replace").strip().splitlines()[-1:]
                rec = {"method": method, "batch": batch, "variant": variant, "status": f"failed: {tail}"}
            rec["subprocess_seconds"] = time.perf_counter() - t0
            runs.append(rec)
            eps = rec.get("examples_per_s")
            log(f"compiled {method} B={batch}: " + (f"{eps:,.0f} examples/s" if eps else rec["status"]))
            report.save()


def make_bundle(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from model.config import LossConfig, method_config
    from model.export import ExportConfig, export
    from model.train import train

    run, bundle = work / "run", work / "bundle"
    cfg = method_config(
        "backbone-rrl", data=work / "data", out=run, batch_size=args.bundle_batch, max_steps=args.bundle_steps,
        device=args.device, progress=False, resume=False, valid_users=0, precision="bf16", prefetch=2,
        loss=LossConfig(shared_in_batch=args.shared_m), lr_scaling="sqrt", lr_warmup_steps=min(50, args.bundle_steps),
        checkpoint_every=10**9,
    )
    t0 = time.perf_counter()
    train(cfg)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = export(ExportConfig(run=run, out=bundle))
    t_export = time.perf_counter() - t0
    summary = json.loads((run / "run.json").read_text())
    return {"run": str(run), "bundle": str(bundle), "train_seconds": t_train, "export_seconds": t_export,
            "train_examples_per_s": summary["examples_per_s"], "steps": summary["steps"],
            "batch": args.bundle_batch, "parity_max_abs_diff": rep["max_abs_diff"], "num_entities": rep["num_entities"]}


def _user_contexts(bundle: Any, n: int, seed: int) -> list[Any]:
    """n random users encoded by the bundle's user encoder (onnxruntime CPU, as the service does)."""
    from service.engine import UserFeatures
    from service.scoring.host import HostGatherScorer

    rng = np.random.default_rng(seed)
    s = bundle.schema
    host = HostGatherScorer(bundle)
    out = []
    for i in range(n):
        seq = np.full(s.max_seq_len, -1, dtype=np.int64)
        h = int(rng.integers(1, s.max_seq_len + 1))
        seq[-h:] = rng.integers(0, bundle.num_entities, h)
        cat = np.array([rng.integers(0, c.cardinality) for c in s.user_categorical], dtype=np.int64)
        q = UserFeatures(cat=cat, num=rng.normal(size=len(s.user_numeric)).astype(np.float32), seq=seq)
        out.append(host.encode(q.cat, q.num, q.seq, i % s.num_domains))
    return out


def _timed(fn: Callable[[], Any], seconds: float, sync: Callable[[], None]) -> float:
    """ms per call of fn, repeated for ~seconds after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % 4 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    sync()
    return (time.perf_counter() - t0) * 1e3 / n


def scorer(args: argparse.Namespace, work: Path, report: Report) -> None:
    import torch

    from benchmarks.torch_scorer import CudaGraphScorer, TorchPairScorer
    from contracts.bundle import load_bundle
    from service.scoring.host import HostGatherScorer

    bundle = load_bundle(work / "bundle", verify_checksums=False)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ctxs = _user_contexts(bundle, max(args.users_per_call), 0)
    host = HostGatherScorer(bundle)
    rng = np.random.default_rng(1)
    out = report.res.setdefault("scorer", {"path": "torch on " + args.device + " (the run's checkpoint as "
                                           "model.export.PairScorerGraph; tables on the device)", "runs": []})
    for precision in args.precisions:
        sc = TorchPairScorer(work / "run", bundle.entity_tensors, dev, precision)
        rows = rng.choice(bundle.num_entities, size=min(2048, bundle.num_entities), replace=False).astype(np.int64)
        user = sc.user_feeds(ctxs[0].feeds, ctxs[0].domain)
        diff = float(np.max(np.abs(sc.score(user, rows) - host.score(ctxs[0], rows))))
        out.setdefault("max_abs_diff_vs_onnxruntime_cpu", {})[precision] = diff
        for b in args.scorer_batches:
            r = torch.from_numpy(rng.integers(0, sc.num_rows, size=b)).to(dev)
            ms = _timed(lambda r=r, sc=sc, u=user: sc.score_device(u, r), args.seconds, sync)
            out["runs"].append({"precision": precision, "mode": "eager", "users": 1, "batch": b, "ms_per_call": ms,
                                "pairs_per_s": b / ms * 1e3})
            log(f"scorer {precision} eager B={b}: {ms:.3f} ms, {b / ms * 1e3:,.0f} pairs/s")
        if cuda:
            try:
                cg = CudaGraphScorer(sc, user, list(args.scorer_batches))
                for b in args.scorer_batches:
                    ms = _timed(lambda b=b, cg=cg: cg.replay(b), args.seconds, sync)
                    out["runs"].append({"precision": precision, "mode": "cuda_graph", "users": 1, "batch": b,
                                        "ms_per_call": ms, "pairs_per_s": b / ms * 1e3})
                    log(f"scorer {precision} CUDA graph B={b}: {ms:.3f} ms, {b / ms * 1e3:,.0f} pairs/s")
                del cg
            except Exception as exc:  # a host sync inside the call breaks capture: record why
                out["runs"].append({"precision": precision, "mode": "cuda_graph", "error": str(exc).splitlines()[0][:200]})
        if sc.batched is not None:
            for users in args.users_per_call:
                cs = ctxs[:users]
                stacked = sc.user_feeds({n: np.concatenate([c.feeds[n] for c in cs]) for n in sc.user_output_names},
                                        np.array([c.domain for c in cs]))
                rr = torch.from_numpy(rng.integers(0, sc.num_rows, size=(len(cs), args.pairs_per_user))).to(dev)
                ms = _timed(lambda s=stacked, r=rr, sc=sc: sc.score_batched_device(s, r), args.seconds, sync)
                pairs = len(cs) * args.pairs_per_user
                out["runs"].append({"precision": precision, "mode": "batched_eager", "users": len(cs),
                                    "batch": pairs, "ms_per_call": ms, "pairs_per_s": pairs / ms * 1e3})
                log(f"scorer {precision} batched {len(cs)}x{args.pairs_per_user}: {ms:.3f} ms, "
                    f"{pairs / ms * 1e3:,.0f} pairs/s")
        sc = None  # free the device tables before the next precision
        if cuda:
            torch.cuda.empty_cache()
        report.save()


def build_index(args: argparse.Namespace, work: Path, proc: Any, site: Path, logfile: Path,
                budget: Budget) -> dict[str, Any]:
    from index_builder.build import build_index as build
    from index_builder.config import IndexConfig

    # the build must leave time for the graph itself (~1 min at 1M on 16 cores, estimated) and the search
    wait_hnswlib(proc, site, logfile, budget.left() - (10 if args.tiny else 100))
    return build(bundle=work / "bundle", cfg=IndexConfig(threads=0))


def lockstep_qps(bundle: Any, score_many: Callable[[list[Any], list[np.ndarray]], list[np.ndarray]],
                 ctxs: list[Any], batch: int, k: int) -> dict[str, Any]:
    """Queries/s of the service's batched lockstep search (``service.lockstep.search_many``) at ``batch``
    requests advanced together: ``score_many(contexts, rows_per_context)`` is ONE scorer call for every
    request's expansion step (the device scorer here), the beams' bookkeeping the service's own."""
    from service.engine import SearchParams
    from service.lockstep import search_many
    from service.search import RequestBeam, VisitedSet

    params = SearchParams().for_k(k)
    visited = [VisitedSet(bundle.num_entities) for _ in range(batch)]

    def run(group: list[Any]) -> None:
        beams = [RequestBeam(bundle.graph, k=k, ef=params.ef, steps=params.steps, top_n=params.top_n, visited=v)
                 for v, _ in zip(visited, group, strict=False)]
        search_many(beams, lambda which, rows: score_many([group[w] for w in which], rows))

    run(ctxs[:batch])  # warm-up (the compiled step kernels load here)
    n = max(2 * batch, 32)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        run([ctxs[(done + i) % len(ctxs)] for i in range(batch)])
        done += batch
    wall = time.perf_counter() - t0
    return {"batch": batch, "queries": done, "qps": done / wall, "path": "service.lockstep.search_many"}


def search(args: argparse.Namespace, work: Path, report: Report) -> None:
    import torch

    from benchmarks.torch_scorer import TorchPairScorer
    from contracts.bundle import load_bundle
    from service.engine import SearchParams
    from service.search import VisitedSet
    from service.search import search as nann_search

    bundle = load_bundle(work / "bundle", verify_checksums=False)
    if bundle.graph is None:
        raise RuntimeError("the bundle has no graph (the index stage did not finish)")
    dev = torch.device(args.device)
    sc = TorchPairScorer(work / "run", bundle.entity_tensors, dev, "bf16")
    ctxs = _user_contexts(bundle, max(args.search_batches) * 2, 7)
    feeds = [sc.user_feeds(c.feeds, c.domain) for c in ctxs]
    params = SearchParams().for_k(args.k)
    local = threading.local()

    def query(i: int) -> float:
        t0 = time.perf_counter()
        vis = getattr(local, "v", None)
        if vis is None:
            vis = local.v = VisitedSet(bundle.num_entities)
        u = feeds[i % len(feeds)]
        nann_search(bundle.graph, lambda cand, u=u: sc.score(u, cand), k=args.k, ef=params.ef, steps=params.steps,
                    top_n=params.top_n, visited=vis)
        return (time.perf_counter() - t0) * 1e3

    out = report.res.setdefault("search", {"k": args.k, "per_request": [], "lockstep": []})
    out["per_request_path"] = ("service.search.search per request in B threads (host beam, GIL-bound), every expansion "
                               "step scored by the torch bf16 scorer on " + args.device + "; user encoder onnxruntime CPU")
    for _ in range(3):
        query(0)
    for b in args.search_batches:
        n = max(2 * b, 32)
        lat: list[float] = []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=b) as pool:
            lat = list(pool.map(query, range(n)))
        wall = time.perf_counter() - t0
        rec = {"batch": b, "queries": n, "qps": n / wall, "p50_ms": float(np.percentile(lat, 50)),
               "p99_ms": float(np.percentile(lat, 99))}
        out["per_request"].append(rec)
        log(f"search per-request B={b}: {rec['qps']:.0f} q/s, p50 {rec['p50_ms']:.1f} ms, p99 {rec['p99_ms']:.1f} ms")
        report.save()

    def score_many(cs: list[Any], rows: list[np.ndarray]) -> list[np.ndarray]:
        # one call for every request's step: pad to the longest, score U x C own candidates
        c = max(len(r) for r in rows)
        padded = np.zeros((len(rows), c), dtype=np.int64)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        users = sc.user_feeds({n: np.concatenate([x.feeds[n] for x in cs]) for n in sc.user_output_names},
                              np.array([x.domain for x in cs]))
        got = sc.score_batched_device(users, torch.from_numpy(padded).to(dev)).float().cpu().numpy()
        return [got[i, : len(r)] for i, r in enumerate(rows)]

    for b in args.search_batches:
        rec = lockstep_qps(bundle, score_many, ctxs, b, args.k)
        out["lockstep"].append(rec)
        log(f"search lockstep B={b}: {rec['qps']:.0f} q/s")
        report.save()


# ---- markdown -----------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    from benchmarks.bench_train import options_table

    lines = [f"# GPU device check ({res.get('device', '?')})", "",
             f"Command: `{res.get('command')}`; torch {res.get('torch')}, {res.get('host', {}).get('cpus')} CPUs; "
             f"tiny dry run: {res.get('tiny')}.", ""]
    lines += ["| stage | status | seconds |", "|---|---|---:|"]
    for name, st in res.get("stages", {}).items():
        lines.append(f"| {name} | {st['status']} | {st.get('seconds', 0):.1f} |")
    for key, title in (("train_speed", "Training examples/s (torch on the device; today = fp32, all B positives as "
                        "negatives)"), ("compile", "With torch.compile (first steps, compilation, excluded)")):
        runs = [r for r in res.get(key, []) if "status" in r]
        if runs:
            lines += ["", f"## {title}", "", options_table({"runs": runs})]
    sc = res.get("scorer")
    if sc:
        lines += ["", f"## Pair scorer ({sc['path']})", "", f"max |torch - onnxruntime CPU|: "
                  f"{sc.get('max_abs_diff_vs_onnxruntime_cpu')}", "",
                  "| precision | mode | users | pairs per call | ms per call | pairs/s |", "|---|---|---:|---:|---:|---:|"]
        for r in sc["runs"]:
            if "error" in r:
                lines.append(f"| {r['precision']} | {r['mode']} | | | {r['error']} | |")
            else:
                lines.append(f"| {r['precision']} | {r['mode']} | {r['users']} | {r['batch']} | {r['ms_per_call']:.3f} "
                             f"| {r['pairs_per_s']:,.0f} |")
    se = res.get("search")
    if se:
        lines += ["", f"## End-to-end search, k={se['k']}", "", f"Per request: {se.get('per_request_path')}", "",
                  "| B concurrent | queries | q/s | p50 ms | p99 ms |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['queries']} | {r['qps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
                  for r in se["per_request"]]
        lines += ["", "Lockstep (the service's batched search, every request's step in one device call):"]
        lines += [f"- B={r['batch']}: {r['qps']:.0f} q/s ({r['path']})" for r in se.get("lockstep", [])]
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See docs/gpu.md.")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_device_out")),
                    help="results folder (default: $OUT)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_device"), help="data, run and bundle")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="dry run: tiny preset, few steps, small batches")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole call")
    ap.add_argument("--hnswlib-sdist", type=Path, default=ROOT / ".device-wheels" / "hnswlib-0.8.0.tar.gz")
    ap.add_argument("--site", type=Path, default=Path(os.environ.get("SITE", "/tmp/site")))
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["backbone", "backbone-rrl"])
    ap.add_argument("--stages", type=lambda s: s.split(","),
                    default=["data", "train_speed", "bundle", "scorer", "index", "search", "compile"])
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.preset = "tiny" if tiny else "1m"
    args.batches = [32, 64] if tiny else [128, 1024, 4096]
    args.variants = ["today", "shared", "shared+bf16", "shared+bf16+prefetch"]
    args.compile_batches = [64] if tiny else [1024, 4096]
    args.steps, args.warmup = (2, 1) if tiny else (10, 3)
    args.shared_m = 16 if tiny else 128
    args.max_pairs = 2_000_000 if tiny else 8_000_000  # today's layout at B=4096 (17M pairs) would need ~90 GB
    args.bundle_batch, args.bundle_steps = (32, 10) if tiny else (1024, 300)
    args.precisions = ["fp32", "bf16", "fp16"]
    args.scorer_batches = [256, 1024] if tiny else [1024, 4096, 16384, 65536]
    args.users_per_call = [4, 8] if tiny else [16, 64, 256]
    args.pairs_per_user = 64 if tiny else 256
    args.search_batches = [1, 4] if tiny else [1, 16, 64, 256]
    args.seconds = 0.2 if tiny else 1.0
    args.k = 20 if tiny else 200

    import torch

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]), "tiny": tiny, "torch": torch.__version__,
        "cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else args.device,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    report = Report(args.out, res)
    budget = Budget(args.budget_s)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        res["error"] = "torch sees no CUDA device"
        report.save()
        log(res["error"])
        return 1
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores (the "today" column too)
        torch.backends.cudnn.allow_tf32 = True
    hnsw_log = work / "hnswlib-build.log"
    proc = None
    s = set(args.stages)
    if "data" in s:
        res["data"] = stage(report, budget, "data", 30 if tiny else 150, lambda: make_data(args, work))
    if "train_speed" in s:
        stage(report, budget, "train_speed", 20, lambda: train_speed(
            args, work, report, budget, args.variants, args.batches, "train_speed", 10 if tiny else 25))
    if "index" in s:  # compiling hnswlib takes a core for about a minute: not while training is timed
        try:
            proc = start_hnswlib_build(args.hnswlib_sdist, args.site, hnsw_log)
        except Exception as exc:
            res["hnswlib"] = f"not available: {exc}"
    if "bundle" in s:
        res["bundle"] = stage(report, budget, "bundle", 20 if tiny else 100, lambda: make_bundle(args, work))
    if "scorer" in s:
        stage(report, budget, "scorer", 10 if tiny else 45, lambda: scorer(args, work, report))
    if "index" in s:
        res["index"] = stage(report, budget, "index", 10 if tiny else 120,
                             lambda: build_index(args, work, proc, args.site, hnsw_log, budget))
    if "search" in s:
        stage(report, budget, "search", 10 if tiny else 40, lambda: search(args, work, report))
    if "compile" in s:  # last: compilation time is the least predictable; each config under a hard timeout
        stage(report, budget, "compile", 10 if tiny else 100, lambda: compiled_speed(args, work, report, budget))
    res["seconds"] = budget.elapsed()
    report.save()
    log(f"done in {budget.elapsed():.0f} s; wrote {args.out}/gpu_device.json and gpu_device.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
