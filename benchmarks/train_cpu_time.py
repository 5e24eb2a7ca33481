"""CPU seconds per training step with one torch thread, today's layout vs the speed options.

Process CPU time, not wall time: on cores shared with other jobs the wall clock swings with their
load, the CPU time a single-threaded step consumes much less. Rounds interleave the configurations.

    .venv/bin/python benchmarks/train_cpu_time.py --data DATA --method backbone-rrl --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (batch, shared_in_batch, precision); shared 128 keeps today's ~193 candidates per example
CONFIGS = [(128, None, "fp32"), (128, 128, "fp32"), (128, 128, "bf16"),
           (1024, None, "fp32"), (1024, 128, "fp32"), (1024, 128, "bf16")]


def main() -> int:
    import torch

    from model.config import LossConfig, method_config
    from model.train import Trainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--method", default="backbone-rrl")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_cpu_time"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = []
    for rnd in range(args.rounds):
        for b, shared, prec in CONFIGS:
            cfg = method_config(args.method, data=args.data, out=args.work, batch_size=b, progress=False, resume=False,
                                valid_users=0, loss=LossConfig(shared_in_batch=shared), max_steps=1 + args.steps,
                                threads=1, precision=prec, checkpoint_every=10**9)
            t = Trainer(cfg)
            it = t.batches()
            t.train_step(next(it))
            t.step += 1
            c = time.process_time()
            for _ in range(args.steps):
                t.train_step(next(it))
                t.step += 1
            per = (time.process_time() - c) / args.steps
            rec = {"round": rnd, "method": args.method, "batch": b, "shared_in_batch": shared, "precision": prec,
                   "cpu_s_per_step": per, "examples_per_cpu_s": b / per}
            res.append(rec)
            print(json.dumps(rec), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "runs": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
