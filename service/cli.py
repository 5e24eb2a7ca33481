"""`unimatch serve` (uvicorn) and `unimatch features load` (user features into Redis).

Both read the ``UNIMATCH_*`` environment only through ``service.config.Settings``, as the service
does; a flag given on the command line wins over its setting.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from unimatch.cli import CliError, CommandRegistry

if TYPE_CHECKING:
    from service.config import Settings

# `unimatch features load` without --redis-url or UNIMATCH_REDIS_URL: a Redis on this machine
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def register(cli: CommandRegistry) -> None:
    from service.config import LogLevel

    p = cli.command(
        "serve",
        help="serve POST /match over HTTP (uvicorn)",
        description="Serve a bundle: POST /match, /match/batch, /healthz, /readyz, /metrics, /v1/info, /admin/reload. "
        "Every UNIMATCH_* setting (docs/service.md) applies; the flags below override them.",
        handler=_serve,
    )
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory; when omitted, UNIMATCH_BUNDLE")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (metrics switch to multiprocess mode)")
    p.add_argument("--data", type=Path, default=None, help="dataset for the embedded feature store (when no Redis)")
    p.add_argument("--redis-url", default=None, help="Redis holding user features; when omitted, UNIMATCH_REDIS_URL")
    p.add_argument("--log-level", default=None, choices=list(get_args(LogLevel)))
    p.add_argument(
        "--graceful-timeout", type=float, default=10.0, help="seconds to finish in-flight requests on SIGTERM"
    )

    f = cli.group_command(
        "features",
        "load",
        help="write every user's features of a dataset into Redis",
        group_help="user feature store (Redis)",
        description="Write each user's profile codes, numeric fields and behaviour sequence (the latest "
        "max_seq_len non-test interactions) into Redis under a schema-fingerprinted key layout "
        "(docs/service.md). Idempotent: re-running overwrites the same keys.",
        handler=_features_load,
    )
    f.add_argument("--data", type=Path, required=True, help="dataset directory")
    f.add_argument("--redis-url", default=None, help=f"Redis URL; when omitted, UNIMATCH_REDIS_URL, else {DEFAULT_REDIS_URL}")
    f.add_argument("--prefix", default=None, help="key prefix; when omitted, UNIMATCH_REDIS_KEY_PREFIX, else 'unimatch'")
    f.add_argument("--chunk", type=int, default=5000, help="users per MSET round trip")


def _settings(**flags: Any) -> Settings:
    """The ``UNIMATCH_*`` settings as the service reads them, ``flags`` winning; an invalid one is a
    one-line error (exit 2)."""
    from service.config import Settings

    try:
        return Settings(**flags)
    except ValueError as exc:
        raise CliError(f"invalid UNIMATCH_* setting: {' '.join(str(exc).splitlines()[:3])}") from None


def _without_password(url: str) -> str:
    """The URL for an error message: a k8s Job's log must not carry the Redis password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()


def _features_load(args: argparse.Namespace) -> int:
    from service.features import load_features
    from unimatch.progress import progress

    settings = _settings()
    url = args.redis_url or settings.redis_url or DEFAULT_REDIS_URL
    prefix = args.prefix or settings.redis_key_prefix
    if args.chunk < 1:
        raise CliError(f"--chunk must be positive, got {args.chunk}")
    import redis

    t0 = time.perf_counter()
    try:
        with progress("features load", unit="users") as update:
            report = load_features(
                args.data,
                url,
                prefix=prefix,
                chunk=args.chunk,
                progress=lambda done, total: update(done, total),
            )
    except redis.exceptions.ConnectionError as exc:
        raise CliError(f"cannot reach Redis at {_without_password(url)}: {exc}") from None
    print(
        f"loaded {report.users:,} users ({report.bytes / 1e6:.1f} MB of values) into {report.keyspace}:u:* "
        f"in {report.seconds:.2f} s: {report.users_per_second:,.0f} users/s "
        f"(total with dataset read {time.perf_counter() - t0:.2f} s)"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    flags = {"bundle": args.bundle, "workers": args.workers, "data": args.data, "redis_url": args.redis_url,
             "log_level": args.log_level}
    given = _settings(**{name: value for name, value in flags.items() if value is not None})
    bundle = given.bundle
    if bundle is None:
        raise CliError("no bundle: pass --bundle BUNDLE or set UNIMATCH_BUNDLE")
    if not (bundle / "manifest.json").is_file():
        raise CliError(f"{bundle}: not a bundle (no manifest.json); run `unimatch export` and `unimatch index build`")
    # Settings travel to the worker processes through the environment: uvicorn re-imports the app in
    # each worker, which builds its own Settings from UNIMATCH_*, so the flags are written there (this
    # command writes the environment; it reads it only through Settings).
    # Absolute, but symlinks kept: /bundles/current must stay the pointer UNIMATCH_BUNDLE_WATCH follows.
    os.environ["UNIMATCH_BUNDLE"] = os.path.abspath(bundle)
    os.environ["UNIMATCH_WORKERS"] = str(args.workers)
    if args.data is not None:
        os.environ["UNIMATCH_DATA"] = str(args.data.resolve())
    if args.redis_url is not None:
        os.environ["UNIMATCH_REDIS_URL"] = args.redis_url
    if args.log_level is not None:
        os.environ["UNIMATCH_LOG_LEVEL"] = args.log_level
    created: list[str] = []  # temporary directories this command made, removed when it exits
    if args.workers > 1:
        # prometheus_client multiprocess mode must be on before any worker imports service.metrics.
        # PROMETHEUS_MULTIPROC_DIR is prometheus_client's own variable, not a UNIMATCH_ setting.
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="unimatch-prom-")
            created.append(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        if given.control_dir is None:
            os.environ["UNIMATCH_CONTROL_DIR"] = tempfile.mkdtemp(prefix="unimatch-control-")
            created.append(os.environ["UNIMATCH_CONTROL_DIR"])
    settings = _settings()  # again: now with what the flags wrote, as each worker will read it
    _configure_logging(settings.log_level)
    _check_bundle(bundle, settings)
    try:
        _run_uvicorn(uvicorn, args, settings)
    except SystemExit as exc:
        if exc.code == 3:  # uvicorn's "startup failed"; the one-line reason is in the log above
            raise CliError("the service did not start (reason logged above)") from None
        raise
    finally:
        import shutil

        for path in created:
            shutil.rmtree(path, ignore_errors=True)
    return 0


def _check_bundle(bundle: Path, settings: Any) -> None:
    """Load and validate the bundle here, before uvicorn: a bad bundle is one line and exit 2, not a
    lifespan traceback and exit 3. The service loads it again (memory maps are cheap; the checksum
    pass is paid twice at start, seconds on a 1M bundle)."""
    from contracts.bundle import load_bundle

    load_bundle(bundle, verify_checksums=settings.verify_checksums)  # BundleError is a ValueError: exit 2


class _OneLineStartupError:
    """A logging filter: a lifespan failure reaches uvicorn as a whole traceback; keep its last line.

    Below ``debug`` level only; ``UNIMATCH_LOG_LEVEL=debug`` keeps the traceback for a bug report.
    """

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        if message.startswith("Traceback (most recent call last)"):
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            record.msg, record.args = f"startup failed: {last}", None
        return True


def _run_uvicorn(uvicorn: Any, args: argparse.Namespace, settings: Any) -> None:
    import logging

    from service.http_guard import GuardedHttpToolsProtocol

    log_level = settings.log_level
    if log_level != "debug":
        logging.getLogger("uvicorn.error").addFilter(_OneLineStartupError())
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
        # Slow and idle clients (docs/service.md "Connections"): header timeout and connection cap in the
        # protocol, body timeout in the edge middleware, idle keep-alive closed by uvicorn.
        http=GuardedHttpToolsProtocol,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        # Our /metrics and access counters cover requests; uvicorn's access log would double the I/O.
        access_log=False,
    )


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
