"""Training benchmarks of the model: examples/s per method, the cost of more negatives, the speed options
(shared negatives, bf16, prefetch, compile) side by side, and a Recall-all results table of every method.

    .venv/bin/python benchmarks/bench_train.py speed --data /tmp/m/small --json /tmp/m/speed.json
    .venv/bin/python benchmarks/bench_train.py results --data /tmp/m/tiny --max-steps 60 --users 300 \
        --json /tmp/m/results.json
    .venv/bin/python benchmarks/bench_train.py scorer /tmp/m/bundle /tmp/m/bundle_split
    .venv/bin/python benchmarks/bench_train.py options --data /tmp/m/small --batches 128,1024,4096 \
        --json docs/results/train-speed-cpu.json

``speed`` times ``--steps`` optimizer steps after ``--warmup`` steps for each method (same batch size,
negatives and model as ``unimatch train`` defaults), then the backbone with several negative counts.
``results`` trains each method with ``model.train.train`` and evaluates Recall-all@N with
``model.evaluate.evaluate``; each finished method is appended to the JSON at once, so a partial run
still leaves usable numbers. Timings depend on the machine's load (shared CPUs): the load average is
recorded next to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_METHODS = ["backbone-rrl", "backbone", "two-tower", "dnn", "shared-bottom", "mmoe", "ple", "cross-stitch", "dselect-k"]
ABLATIONS = ["backbone-dal", "backbone-dal-uwl", "backbone-mvwdl", "backbone-rrl-adv"]


def _load() -> float:
    return os.getloadavg()[0]


def speed(args: argparse.Namespace) -> dict:
    from model.config import LossConfig, method_config
    from model.train import Trainer

    out: dict = {"data": str(args.data), "batch_size": args.batch_size, "device": args.device, "methods": {}, "negatives": {}}

    def time_steps(method: str, negatives: int) -> float:
        cfg = method_config(
            method, data=args.data, out=Path(args.work) / f"speed-{method}-{negatives}", batch_size=args.batch_size,
            progress=False, resume=False, device=args.device, loss=dataclasses.replace(LossConfig(), num_sampled=negatives),
        )
        t = Trainer(cfg)
        for i in range(args.warmup):
            t.train_step(t.batch_rows(0, i))
        t0 = time.perf_counter()
        for i in range(args.steps):
            t.train_step(t.batch_rows(0, args.warmup + i))
        return args.steps * args.batch_size / (time.perf_counter() - t0)

    for method in args.methods:
        load0 = _load()
        eps = time_steps(method, args.default_negatives)
        out["methods"][method] = {"examples_per_s": eps, "load_avg_1m": load0}
        print(f"{method:18s} {eps:8.1f} examples/s   (load {load0:.1f})", flush=True)
        _save(args.json, out)
    for neg in args.negatives:
        load0 = _load()
        eps = time_steps("backbone", neg)
        out["negatives"][str(neg)] = {"examples_per_s": eps, "load_avg_1m": load0}
        print(f"backbone negatives={neg:5d} {eps:8.1f} examples/s   (load {load0:.1f})", flush=True)
        _save(args.json, out)
    return out


VARIANT_TOKENS = ("today", "shared", "bf16", "prefetch", "compile")


def parse_variant(name: str) -> set[str]:
    """'shared+bf16+prefetch' -> its options; 'today' is the CPU default (every option off)."""
    tokens = set(name.split("+"))
    unknown = tokens - set(VARIANT_TOKENS)
    if unknown or not tokens:
        raise SystemExit(f"error: unknown variant option(s) {sorted(unknown)} in {name!r}; use {'+'.join(VARIANT_TOKENS)}")
    return tokens - {"today"}


def time_training(data: Path, method: str, batch: int, variant: str, *, steps: int, warmup: int, device: str,
                  shared_m: int, negatives: int, max_pairs: int, work: Path, threads: int | None = None) -> dict:
    """examples/s of ``steps`` training steps after ``warmup`` (compilation, allocator), one config.

    Steps run through ``Trainer.batches()``, so a prefetching variant overlaps batch preparation as in
    ``unimatch train``. A config whose pairs per step exceed ``max_pairs`` is skipped (today's layout
    at B = 4096 is 17M pairs a step: tens of GB of activations), and an out-of-memory error is
    recorded rather than raised, so one run fills the whole table.
    """
    import torch

    from model.config import LossConfig, method_config
    from model.train import Trainer

    opts = parse_variant(variant)
    loss = LossConfig(num_sampled=negatives, shared_in_batch=shared_m if "shared" in opts else None)
    candidates = (1 + shared_m + negatives) if "shared" in opts else (batch + negatives)  # per example
    rec: dict = {"method": method, "batch": batch, "variant": variant, "candidates_per_example": candidates,
                 "pairs_per_step": batch * candidates, "device": device, "load_avg_1m": _load()}
    if batch * candidates > max_pairs:
        rec["status"] = f"skipped: {batch * candidates:,} pairs per step > --max-pairs {max_pairs:,}"
        return rec
    cfg = method_config(
        method, data=data, out=work / f"speed-{method}-{batch}-{variant}", batch_size=batch, progress=False,
        resume=False, device=device, loss=loss, valid_users=0, max_steps=warmup + steps, threads=threads,
        precision="bf16" if "bf16" in opts else "fp32", prefetch=2 if "prefetch" in opts else 0,
        compile="compile" in opts, checkpoint_every=10**9,
    )
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = None
    try:
        t = Trainer(cfg)
        if t.steps_per_epoch < 1:
            rec["status"] = "skipped: fewer training interactions than one batch"
            return rec
        it = t.batches()
        t_first = time.perf_counter()
        for _ in range(warmup):
            t.train_step(next(it))
            t.step += 1
        sync()
        rec["warmup_seconds"] = time.perf_counter() - t_first
        t0 = time.perf_counter()
        for _ in range(steps):
            t.train_step(next(it))
            t.step += 1
        sync()
        dt = time.perf_counter() - t0
        rec.update(status="ok", examples_per_s=steps * batch / dt, seconds_per_step=dt / steps,
                   compiled=t.compiled if "compile" in opts else None)
        if cuda:
            rec["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError as exc:  # the same class as torch.OutOfMemoryError on newer torch
        rec["status"] = f"out of memory ({str(exc).splitlines()[0][:120]})"
    finally:
        if t is not None:
            close = getattr(it, "close", None) if "it" in locals() else None
            if close is not None:
                close()
        del t
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return rec


def options(args: argparse.Namespace) -> dict:
    """Every (method, batch, variant) side by side in one run: the speed options on and off."""
    import platform

    out: dict = {
        "command": " ".join(["python", *sys.argv]), "data": str(args.data), "device": args.device,
        "shared_m": args.shared_m, "negatives": args.default_negatives, "steps": args.steps, "warmup": args.warmup,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": [],
    }
    for method in args.methods:
        for batch in args.batches:
            # rounds interleave the variants (A B C A B C ...): on shared cores the load drifts between
            # configs, and the table reports each variant's median over the rounds
            for rnd, variant in [(r, v) for r in range(args.rounds) for v in args.variants]:
                rec = time_training(args.data, method, batch, variant, steps=args.steps, warmup=args.warmup,
                                    device=args.device, shared_m=args.shared_m, negatives=args.default_negatives,
                                    max_pairs=args.max_pairs, work=Path(args.work), threads=args.threads)
                rec["round"] = rnd
                out["runs"].append(rec)
                eps = rec.get("examples_per_s")
                print(f"{method:14s} B={batch:5d} {variant:24s} "
                      + (f"{eps:9.1f} examples/s" if eps else rec["status"]) + f"  (load {rec['load_avg_1m']:.1f})",
                      flush=True)
                _save(args.json, out)
    out["load_avg_at_end"] = list(os.getloadavg())
    _save(args.json, out)
    return out


def options_table(obj: dict) -> str:
    """Markdown: one row per (method, batch), one column per variant (examples/s, x today's)."""
    variants = list(dict.fromkeys(r["variant"] for r in obj["runs"]))
    lines = ["| method | batch | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    keys = list(dict.fromkeys((r["method"], r["batch"]) for r in obj["runs"]))
    for method, batch in keys:
        cells: dict[str, dict] = {}
        for v in variants:  # the median over rounds (one round: the run itself)
            recs = [r for r in obj["runs"] if r["method"] == method and r["batch"] == batch and r["variant"] == v]
            timed = sorted((r for r in recs if r.get("examples_per_s")), key=lambda r: r["examples_per_s"])
            if timed:
                cells[v] = timed[(len(timed) - 1) // 2]
            elif recs:
                cells[v] = recs[0]
        base = cells.get("today", {}).get("examples_per_s")
        row = []
        for v in variants:
            r = cells.get(v)
            if r is None:
                row.append("")
            elif r.get("examples_per_s"):
                ratio = f" ({r['examples_per_s'] / base:.2f}x)" if base and v != "today" else ""
                row.append(f"{r['examples_per_s']:,.0f}{ratio}")
            else:
                row.append(r["status"].split(":")[0].split(" (")[0])
        lines.append(f"| {method} | {batch} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def results(args: argparse.Namespace) -> dict:
    from model.config import method_config
    from model.evaluate import EvalConfig, evaluate
    from model.train import train

    out: dict = {"data": str(args.data), "max_steps": args.max_steps, "batch_size": args.batch_size, "users": args.users,
                 "ns": args.n, "device": args.device, "methods": {}}
    if args.json and Path(args.json).is_file():
        out = json.loads(Path(args.json).read_text())  # continue a partial run
    from model.config import METHODS

    override = json.loads(args.rrl_override) if args.rrl_override else {}
    for method in args.methods:
        key = method + (f"[{args.rrl_override}]" if override else "")
        if key in out["methods"]:
            continue
        rrl = dataclasses.replace(METHODS[method].rrl, **override)
        cfg = method_config(method, data=args.data, out=Path(args.work) / f"run-{method}", max_steps=args.max_steps,
                            batch_size=args.batch_size, progress=False, resume=False, device=args.device, rrl=rrl)
        t0 = time.perf_counter()
        run = train(cfg)
        t_train = time.perf_counter() - t0
        res = evaluate(EvalConfig(run=run, ns=tuple(args.n), max_users=args.users, progress=False, device=args.device,
                                  pair_budget=args.pair_budget))
        out["methods"][key] = {
            "recall_all": res["recall_all"], "train_seconds": t_train, "eval_seconds": res["seconds"],
            "load_avg_1m": _load(),
        }
        avg = res["recall_all"]["average"]
        print(f"{key:18s} " + " ".join(f"R@{n}={avg[str(n)]:.4f}" for n in args.n) + f"  train {t_train:.0f}s", flush=True)
        _save(args.json, out)
    return out


def scorer_latency(args: argparse.Namespace) -> int:
    """Median pair-scorer latency (onnxruntime, 1 thread) per batch size, and entity bytes, per bundle."""
    import numpy as np
    import onnxruntime as ort

    for bundle in args.bundles:
        m = json.loads((Path(bundle) / "manifest.json").read_text())
        schema = json.loads((Path(bundle) / "schema.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        user = ort.InferenceSession(str(Path(bundle) / "user_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        scorer = ort.InferenceSession(str(Path(bundle) / "pair_scorer.onnx"), opts, providers=["CPUExecutionProvider"])
        L = schema["max_seq_len"]
        outs = user.run(m["user_outputs"], {
            "user_cat": np.zeros((1, len(schema["user_categorical"])), np.int64),
            "user_num": np.zeros((1, len(schema["user_numeric"])), np.float32),
            "seq": (np.arange(L, dtype=np.int64) % m["num_entities"])[None], "domain": np.array([0], np.int64)})
        ents = {n: np.load(Path(bundle) / i["file"], mmap_mode="r") for n, i in m["entity_tensors"].items()}
        per_entity = sum(int(np.prod(i["shape"][1:])) * 4 for i in m["entity_tensors"].values())
        for batch in args.batches:
            feed = {**dict(zip(m["user_outputs"], outs, strict=True)), "domain": np.array([0], np.int64),
                    **{n: np.ascontiguousarray(v[:batch]) for n, v in ents.items()}}
            for _ in range(5):
                scorer.run(["score"], feed)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                scorer.run(["score"], feed)
                times.append(time.perf_counter() - t0)
            print(f"{bundle}: batch {batch}: p50 {np.median(times) * 1e3:.3f} ms, entity bytes/entity {per_entity}, "
                  f"first_layer_split={m.get('first_layer_split')}, load {_load():.1f}", flush=True)
    return 0


def _save(path: str | None, obj: dict) -> None:
    if path:
        from contracts.io import atomic_write_json

        atomic_write_json(Path(path), obj)


def table(obj: dict) -> str:
    """Markdown for docs/model.md from a results or speed JSON."""
    if "ns" in obj:
        ns = [str(n) for n in obj["ns"]]
        doms = [d for d in next(iter(obj["methods"].values()))["recall_all"] if d != "average"]
        head = "| method | " + " | ".join(f"{d} R@{n}" for d in doms for n in ns) + " | **avg** " + " | **avg** ".join(f"R@{n}" for n in ns) + " |"
        lines = [head, "|---|" + "---:|" * (len(doms) * len(ns) + len(ns))]
        for m, r in obj["methods"].items():
            ra = r["recall_all"]
            cells = [f"{ra[d][n]:.4f}" for d in doms for n in ns] + [f"**{ra['average'][n]:.4f}**" for n in ns]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    lines = ["| method | examples/s | load avg |", "|---|---:|---:|"]
    lines += [f"| {m} | {v['examples_per_s']:.1f} | {v['load_avg_1m']:.1f} |" for m, v in obj["methods"].items()]
    lines += ["", "| backbone, sampled negatives | examples/s | load avg |", "|---|---:|---:|"]
    lines += [f"| {n} | {v['examples_per_s']:.1f} | {v['load_avg_1m']:.1f} |" for n, v in obj["negatives"].items()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "results"):
        s = sub.add_parser(name)
        s.add_argument("--data", type=Path, required=True)
        s.add_argument("--methods", type=lambda v: v.split(","), default=BASE_METHODS + ABLATIONS)
        s.add_argument("--batch-size", type=int, default=128)
        s.add_argument("--json", default=None)
        s.add_argument("--work", default="/tmp/bench_train")
        s.add_argument("--device", default="cpu")
    sp = sub.choices["speed"]
    sp.add_argument("--steps", type=int, default=5)
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--default-negatives", type=int, default=64)
    sp.add_argument("--negatives", type=lambda v: [int(x) for x in v.split(",")], default=[0, 64, 256, 1024])
    rs = sub.choices["results"]
    rs.add_argument("--max-steps", type=int, default=60)
    rs.add_argument("--users", type=int, default=300)
    rs.add_argument("--rrl-override", default="", help='JSON of RRLConfig fields, e.g. {"grl_lambda": 0.1}')
    rs.add_argument("--pair-budget", type=int, default=32768, help="pairs per scoring pass in eval (GPU: 1<<20)")
    rs.add_argument("--n", type=lambda v: [int(x) for x in v.split(",")], default=[50, 200])
    op = sub.add_parser("options", help="examples/s per method and batch size, speed options on/off side by side")
    op.add_argument("--data", type=Path, required=True)
    op.add_argument("--methods", type=lambda v: v.split(","), default=["backbone", "backbone-rrl"])
    op.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[128, 1024, 4096])
    op.add_argument("--variants", type=lambda v: v.split(","),
                    default=["today", "shared", "shared+prefetch", "shared+bf16", "shared+bf16+prefetch"],
                    help="comma-separated; each a '+'-joined set of: " + ", ".join(VARIANT_TOKENS))
    op.add_argument("--shared-m", type=int, default=128,
                    help="in-batch positives shared per step: 128 keeps today's ~193 candidates per example")
    op.add_argument("--default-negatives", type=int, default=64)
    op.add_argument("--steps", type=int, default=4)
    op.add_argument("--warmup", type=int, default=2)
    op.add_argument("--max-pairs", type=int, default=2_000_000, help="skip configs above this many pairs per step")
    op.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    op.add_argument("--rounds", type=int, default=1, help="repeat the variants interleaved; the table shows medians")
    op.add_argument("--device", default="cpu")
    op.add_argument("--json", default=None)
    op.add_argument("--work", default="/tmp/bench_train")
    sl = sub.add_parser("scorer", help="pair-scorer latency and entity memory of exported bundles")
    sl.add_argument("bundles", nargs="+")
    sl.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[64, 256])
    sl.add_argument("--repeat", type=int, default=50)
    tb = sub.add_parser("table", help="print the markdown table of a JSON written by speed or results")
    tb.add_argument("json")
    args = p.parse_args()
    if args.cmd == "scorer":
        return scorer_latency(args)
    if args.cmd == "table":
        obj = json.loads(Path(args.json).read_text())
        print(options_table(obj) if "runs" in obj else table(obj))
        return 0
    if args.cmd == "options":
        print(options_table(options(args)))
        return 0
    obj = speed(args) if args.cmd == "speed" else results(args)
    print(table(obj))
    return 0


if __name__ == "__main__":
    sys.exit(main())
