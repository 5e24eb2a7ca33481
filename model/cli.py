"""`unimatch train`, `unimatch eval`, `unimatch export`: thin layers over model.train / evaluate / export."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from unimatch.cli import CommandRegistry

# --early-stop without --epochs/--max-steps: a budget large enough to reach convergence on small
# datasets; the patience, not this, is what normally ends the run
EARLY_STOP_EPOCHS = 100


def register(cli: CommandRegistry) -> None:
    from model.config import BASELINES, DEVICES, METHODS, NegativeSampler

    p = cli.command(
        "train",
        help="train a matching model (Backbone & RRL, ablations, baselines, two-tower)",
        description="Train METHOD on a dataset directory into a run directory (config.json, checkpoint.pt, "
        "log.jsonl, run.json, aux_losses.png). Resumes from RUN/checkpoint.pt when present. Runs under "
        "torchrun for DistributedDataParallel.",
        handler=_train,
    )
    p.add_argument("--data", type=Path, required=True, help="dataset directory")
    p.add_argument("--method", required=True, choices=sorted(METHODS), metavar="METHOD", help=f"one of {', '.join(sorted(METHODS))}")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training interactions; unset = 1, or at most {EARLY_STOP_EPOCHS} with --early-stop")
    p.add_argument("--max-steps", type=int, default=None,
                   help="train exactly N optimizer steps, repeating epochs as needed (overrides --epochs)")
    p.add_argument("--early-stop", action="store_true",
                   help="check validation Recall-all every --eval-every steps; stop after --patience checks without "
                   "gain and keep the best weights in RUN/best.pt (eval and export use them)")
    p.add_argument("--patience", type=int, default=3, help="checks without gain before --early-stop stops")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation checks; unset = one epoch")
    p.add_argument("--valid-users", type=int, default=256,
                   help="validation users scored per check (0 = no validation figure)")
    p.add_argument("--valid-n", type=int, default=50, help="N of the validation Recall-all@N")
    p.add_argument("--valid-pair-budget", type=int, default=1_000_000,
                   help="at most this many (user, entity) pairs per validation check: fewer users on a big catalogue")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate (at --lr-reference-batch when --lr-scaling is linear or sqrt)")
    p.add_argument("--lr-scaling", choices=["none", "linear", "sqrt"], default="none",
                   help="scale --lr to the batch size: linear (B/ref), sqrt (sqrt(B/ref), the Adam rule), none")
    p.add_argument("--lr-reference-batch", type=int, default=128, help="batch size --lr was tuned at")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up over N steps")
    p.add_argument("--shared-negatives", type=int, default=None, metavar="M",
                   help="in-batch negatives: M of the batch's positives shared by every user, so a step costs "
                   "B x (1 + M + negatives) pairs (large batches); unset = all B (B x (B + negatives) pairs)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: forward under bfloat16 autocast (tensor cores on CUDA), float32 weights and loss")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (falls back to eager with a warning where unavailable)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="prepare N batches ahead in a background thread (0 = inline); same batches either way")
    p.add_argument("--negatives", type=int, default=None, help="sampled negatives per step (default 64)")
    p.add_argument("--sampler", choices=sorted(s.value for s in NegativeSampler), default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--adv-epsilon", type=float, default=None, help="FGSM epsilon of the adversarial option")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=DEVICES, help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN has a checkpoint")
    p.add_argument("--no-progress", action="store_true")

    e = cli.command(
        "eval",
        help="Recall-all@N per domain and average (paper Eq. 26)",
        description="Exhaustively score every eligible entity of each domain for each test user (capped by "
        "--users) and report Recall-all@N as JSON and a markdown table. Recall-all is per domain the mean over "
        "its test users of |G_u ∩ top N| / |G_u|, and 'average' the mean over domains (each domain weighs the "
        "same); the mean over all (user, domain) queries is reported apart as recall_all_micro. "
        "--baseline popularity scores the model-free yardstick (the N most popular entities of the domain) "
        "on the same users instead of a run.",
        handler=_eval,
    )
    e.add_argument("--run", type=Path, default=None, help="run directory (uses RUN/best.pt when --early-stop kept one)")
    e.add_argument("--baseline", choices=BASELINES, default=None,
                   help="evaluate a model-free baseline on --data instead of a run")
    e.add_argument("--data", type=Path, default=None, help="dataset (default: the one the run was trained on)")
    e.add_argument("--n", default="50,200", help="comma-separated N values")
    e.add_argument("--users", type=int, default=2000, help="test users evaluated (random, seeded)")
    e.add_argument("--json", type=Path, default=None, help="write the JSON here (also RUN/eval.json)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu", choices=DEVICES, help="cpu or cuda")
    e.add_argument("--no-progress", action="store_true")

    x = cli.command(
        "export",
        help="export a trained run to a serving bundle (ONNX + entity tensors + manifest)",
        description="Write BUNDLE per docs/bundle-format.md: user_encoder.onnx, pair_scorer.onnx, entities/*.npy, "
        "schema.json, manifest.json; checks onnx.checker and onnxruntime-vs-PyTorch parity.",
        handler=_export,
    )
    x.add_argument("--run", type=Path, required=True)
    x.add_argument(
        "--out", type=Path, required=True,
        help="bundle directory to write (atomically); must be missing, empty, or (with --force) an earlier bundle",
    )
    x.add_argument("--force", action="store_true", help="replace an existing bundle in --out (never a foreign directory)")
    x.add_argument("--data", type=Path, default=None, help="dataset (default: the one the run was trained on)")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--first-layer-split", action="store_true",
                   help="precompute the entity part of the experts' first layers (backbone methods; more memory, less per-candidate work)")


def _train(args: argparse.Namespace) -> int:
    from model.config import ConfigError, LossConfig, ModelConfig, NegativeSampler, method_config
    from model.train import dist_env, train

    _check_run_dir(args.out)

    loss = LossConfig()
    if args.negatives is not None:
        loss = dataclasses.replace(loss, num_sampled=args.negatives)
    if args.sampler is not None:
        loss = dataclasses.replace(loss, sampler=NegativeSampler(args.sampler))
    if args.shared_negatives is not None:
        loss = dataclasses.replace(loss, shared_in_batch=args.shared_negatives)
    model = ModelConfig() if args.embed_dim is None else ModelConfig(embed_dim=args.embed_dim)
    overrides = {}
    if args.adv_epsilon is not None:
        from model.config import METHODS

        overrides["rrl"] = dataclasses.replace(METHODS[args.method].rrl, adv_epsilon=args.adv_epsilon)
    try:
        cfg = method_config(
            args.method,
            data=args.data,
            out=args.out,
            epochs=args.epochs if args.epochs is not None else (EARLY_STOP_EPOCHS if args.early_stop else 1),
            max_steps=args.max_steps,
            early_stop=args.early_stop,
            patience=args.patience,
            eval_every=args.eval_every,
            valid_users=args.valid_users,
            valid_n=args.valid_n,
            valid_pair_budget=args.valid_pair_budget,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_scaling=args.lr_scaling,
            lr_reference_batch=args.lr_reference_batch,
            lr_warmup_steps=args.warmup_steps,
            precision=args.precision,
            compile=args.compile,
            prefetch=args.prefetch,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
            checkpoint_every=args.checkpoint_every,
            resume=not args.no_resume,
            progress=not args.no_progress,
            model=model,
            loss=loss,
            **overrides,
        )
    except ConfigError:
        raise
    out = train(cfg)
    import json

    if dist_env()[1] != 0:
        return 0  # under torchrun only rank 0 reports

    print(summary_line(json.loads((out / "run.json").read_text()), out))
    return 0


def summary_line(summary: dict[str, Any], out: Path) -> str:
    """The final line of ``train``: steps, epochs, the best validation figure, where it went."""
    line = (
        f"trained {summary['method']}: {summary['steps']} steps = {summary['epochs']:.2f} epochs "
        f"of {summary['steps_per_epoch']} steps in {summary['seconds']:.1f} s ({summary['examples_per_s']:.0f} examples/s)"
    )
    early = bool(summary.get("early_stop"))
    # without --early-stop the run's weights are the last step's: report that check, not an older best
    value = summary.get("valid_recall_all_best" if early else "valid_recall_all_final")
    if value is None:
        line += "; no validation figure (no validation users, --valid-users 0, or none within --valid-pair-budget)"
    else:
        kind, step = ("best validation", summary["best_step"]) if early else ("validation", summary["steps"])
        line += (
            f"; {kind} Recall-all@{summary['valid_n']} {value:.4f} at step {step} "
            f"({summary['valid_users']} validation users)"
        )
        if summary.get("early_stopped"):
            line += " (stopped early)"
        if summary.get("checkpoint_used") == "best.pt":
            line += "; best.pt kept for eval/export"
    return f"{line} -> {out}"


def _check_run_dir(out: Path) -> None:
    """A run directory is resumed in place, so it must be missing, empty, or one of our runs.

    Training writes config.json, schema.json, log.jsonl ... straight into it (no atomic swap, as a
    run resumes from its checkpoint), so a foreign directory would have those files overwritten.
    """
    from contracts.io import OutputDirError

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputDirError(f"{out}: not a directory; give a run directory as --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise OutputDirError(
            f"{out}: not empty and not a unimatch run (no config.json); training would write over its files: "
            "choose another --out"
        )


def _eval(args: argparse.Namespace) -> int:
    from model.evaluate import EvalConfig, evaluate, markdown_table

    try:
        ns = tuple(int(v) for v in str(args.n).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--n must be comma-separated integers, got {args.n!r}") from None
    if not ns or min(ns) < 1:
        raise ValueError(f"--n values must be >= 1, got {args.n!r}")
    if args.users < 1:
        raise ValueError(f"--users must be >= 1, got {args.users}")
    if (args.run is None) == (args.baseline is None):
        raise ValueError("give exactly one of --run RUN or --baseline popularity")
    if args.baseline is not None:
        from model.evaluate import evaluate_baseline

        if args.data is None:
            raise ValueError("--baseline needs --data DIR")
        print(markdown_table(evaluate_baseline(args.data, args.baseline, ns=ns, max_users=args.users, seed=args.seed,
                                               json=args.json)))
        return 0
    result = evaluate(
        EvalConfig(run=args.run, data=args.data, ns=ns, max_users=args.users, seed=args.seed, json=args.json,
                   progress=not args.no_progress, device=args.device)
    )
    print(markdown_table(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from contracts.io import check_output_dir
    from model.export import ExportConfig, export

    check_output_dir(args.out, marker="manifest.json", force=args.force)  # before loading torch and the run

    from unimatch.progress import working

    with working(f"export: {args.run} -> {args.out}"):  # ONNX export + the torch/onnxruntime comparison
        report = export(
            ExportConfig(run=args.run, out=args.out, data=args.data, opset=args.opset,
                         first_layer_split=args.first_layer_split)
        )
    print(
        f"exported {report['method']} ({report['kind']}) to {args.out}: {report['num_entities']:,} entities, "
        f"max |onnx - torch| = {report['max_abs_diff']:.2e}"
    )
    return 0
