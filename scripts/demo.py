"""`make demo`: run the whole UniMatch path on a small synthetic dataset and leave the service up.

Steps (each one a `unimatch` command an operator could type): synthesise a dataset -> train the
Backbone&RRL model -> evaluate Recall-all@N -> export the serving bundle -> build the 4-layer HNSW
graph -> load user features into Redis (or fall back to the embedded store when no Redis answers) ->
serve on http://127.0.0.1:8000 (--port; `make demo PORT=8001`). Artefacts go under ./demo/ (git-ignored); re-running reuses finished
steps unless --fresh is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIMATCH = str(ROOT / ".venv" / "bin" / "unimatch")


def run(*args: str) -> None:
    print("\n+ unimatch " + " ".join(args), flush=True)
    subprocess.run([UNIMATCH, *args], check=True)


def redis_answers(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo", help="where the demo's artefacts go")
    parser.add_argument("--preset", default="small", help="synthetic dataset preset")
    parser.add_argument("--method", default="backbone-rrl", help="training method")
    parser.add_argument("--max-steps", default="100", help="training steps: brief, so the demo finishes in minutes on 2 CPU cores")
    parser.add_argument("--eval-users", default="100", help="test users for Recall-all@N (exhaustive scoring is costly on CPU)")
    parser.add_argument("--port", default="8000")
    parser.add_argument("--fresh", action="store_true", help="redo every step")
    parser.add_argument("--no-serve", action="store_true", help="stop after preparing the bundle and features")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from port_free import port_free

    if not str(args.port).isdigit() or not port_free(int(args.port)):
        # before any step: finding a busy port after the training would waste minutes
        print(f"demo: port {args.port} on 127.0.0.1 is busy or invalid; pass --port (make demo PORT=8001)", file=sys.stderr)
        return 2

    out: Path = args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    data, run_dir, bundle = out / "data", out / "run", out / "bundle"

    if not (data / "dataset.json").is_file():
        run("data", "synth", "--out", str(data), "--preset", args.preset, "--seed", "0")
    run("data", "describe", str(data))
    if not (run_dir / "DONE").is_file():
        run("train", "--data", str(data), "--method", args.method, "--out", str(run_dir), "--max-steps", args.max_steps)
        (run_dir / "DONE").write_text("ok\n")
    if not (out / "eval.json").is_file():
        run("eval", "--run", str(run_dir), "--data", str(data), "--n", "50,200", "--users", args.eval_users,
            "--json", str(out / "eval.json"))
    if not (bundle / "graph_health.json").is_file():
        run("export", "--run", str(run_dir), "--out", str(bundle), "--force")  # ours: a bundle left without its graph
        run("index", "build", "--bundle", str(bundle))

    serve_args = ["serve", "--bundle", str(bundle), "--port", args.port]
    env = dict(os.environ)
    if redis_answers():
        run("features", "load", "--data", str(data), "--redis-url", "redis://127.0.0.1:6379/0")
        serve_args += ["--redis-url", "redis://127.0.0.1:6379/0"]
    else:
        print("\nno Redis at 127.0.0.1:6379: the service reads user features from the dataset (embedded store)")
        serve_args += ["--data", str(data)]

    schema = json.loads((data / "schema.json").read_text())
    user = json.loads(subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c",
         f"import numpy as np; print('\"' + str(np.load('{data}/users/external_id.npy')[0]) + '\"')"],
        check=True, capture_output=True, text=True,
    ).stdout)
    body = json.dumps({"user_id": user, "domain": schema["domains"][0], "k": 10})
    print(
        "\nUniMatch is starting on http://127.0.0.1:" + args.port + "  (Ctrl-C stops it). Try:\n"
        f"  curl -s -X POST http://127.0.0.1:{args.port}/match -H 'content-type: application/json' -d '{body}'\n"
        f"  curl -s http://127.0.0.1:{args.port}/v1/info\n"
    )
    if args.no_serve:
        return 0
    os.execve(UNIMATCH, [UNIMATCH, *serve_args], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
