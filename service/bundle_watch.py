"""Bundles that roll out by themselves: a ``current`` pointer swapped atomically, watched by every worker.

Layout (docs/deploy.md "Publishing a new model")::

    /bundles/versions/<version>/   one directory per exported bundle, never modified once published
    /bundles/current -> versions/<version>     a symlink, the only thing that changes

* :func:`publish` points ``current`` at a version with ONE ``rename(2)`` of a freshly made symlink
  over the old one, so a reader resolving ``current`` finds the old bundle or the new one, never none
  and never a half-written directory (the two ``mv``s this replaces left a moment with no bundle).
* :func:`watch` runs in every worker process when ``UNIMATCH_BUNDLE_WATCH`` is on: it polls the
  pointer, and when it resolves to a bundle whose version differs from the one served, waits a random
  share of ``UNIMATCH_BUNDLE_WATCH_STAGGER_S`` (so pods and workers do not all load, verify and warm
  at the same moment, and most keep full capacity meanwhile) and reloads that *resolved* directory
  through the normal hot-reload path (in-flight requests finish on the old bundle, 0 failures). It
  reloads the resolved path, not the pointer, so a second publish during the load cannot mix files of
  two versions.
* Each worker publishes what it serves (``unimatch_bundle_info{version=...}``, ``GET /v1/info``);
  :func:`unused_versions` lists the version directories no worker serves, which are the only ones
  safe to delete (pods that have not reloaded still memory-map theirs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from service.errors import ReloadBusy, ReloadFailed

log = logging.getLogger("unimatch.bundle_watch")


class Reloadable(Protocol):
    """The part of ``service.state.ServiceState`` the watcher uses."""

    @property
    def serving_version(self) -> str | None: ...

    async def reload_bundle(self, target: Path, *, wait: bool, broadcast: bool = True) -> object: ...


class PublishError(Exception):
    """The pointer cannot be swapped (one line for the operator)."""


def bundle_version(directory: Path) -> str | None:
    """``bundle_version`` of the manifest in ``directory``; None if it is not a readable bundle."""
    try:
        return str(json.loads((directory / "manifest.json").read_text())["bundle_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish(version_dir: Path, pointer: Path) -> Path:
    """Point the symlink ``pointer`` at ``version_dir`` atomically; returns the resolved target.

    The link is relative when the version lies under the pointer's directory (so the tree can be
    mounted anywhere, e.g. /bundles in every container). Refuses a ``pointer`` that is a real
    directory (the old layout): replacing it would need the two-step move this module exists to avoid.
    """
    if bundle_version(version_dir) is None:
        raise PublishError(f"{version_dir} is not a bundle (no readable manifest.json with a bundle_version)")
    if pointer.exists() and not pointer.is_symlink():
        raise PublishError(f"{pointer} is a directory, not a symlink: move it under versions/ first (docs/deploy.md)")
    root = pointer.parent
    target = os.path.abspath(version_dir)  # not resolved: versions/<v> may itself be a link
    link = os.path.relpath(target, os.path.abspath(root))
    if link.startswith(".."):  # outside the pointer's directory: an absolute link
        link = target
    tmp = root / f".{pointer.name}.{os.getpid()}.new"
    tmp.unlink(missing_ok=True)  # a leftover of this same process id only
    os.symlink(link, tmp)
    os.replace(tmp, pointer)  # rename(2): atomic on POSIX filesystems, NFS included
    return pointer.resolve()


def unused_versions(versions_dir: Path, pointer: Path, served: Iterable[str]) -> list[Path]:
    """Version directories that are neither the pointer's target nor served by any worker."""
    served = set(served)
    current = pointer.resolve() if pointer.exists() else None
    out = []
    for d in sorted(p for p in versions_dir.iterdir() if p.is_dir()):
        if d.resolve() == current:
            continue
        version = bundle_version(d)
        if version is None or version in served:
            continue
        out.append(d)
    return out


async def watch(
    state: Reloadable,
    pointer: Path,
    *,
    poll_s: float,
    stagger_s: float,
    rng: random.Random | None = None,
) -> None:
    """Follow ``pointer`` forever (cancel the task to stop); see the module docstring."""
    rng = rng or random.Random()
    last: Path | None = None  # the last target handled (served, or refused: not retried until it moves)
    missing_logged = False
    while True:
        await asyncio.sleep(poll_s)
        try:
            target = pointer.resolve(strict=True)
        except OSError:
            if not missing_logged:
                log.warning("bundle pointer %s does not resolve; still serving %s", pointer, state.serving_version)
                missing_logged = True
            continue
        missing_logged = False
        if target == last:
            continue
        version = bundle_version(target)
        if version is None or version == state.serving_version:
            last = target
            continue
        delay = rng.uniform(0.0, stagger_s)
        log.info("bundle pointer %s -> %s (version %s); reloading in %.1f s", pointer, target, version, delay)
        await asyncio.sleep(delay)
        try:
            target = pointer.resolve(strict=True)  # it may have moved again while we waited
        except OSError:
            continue
        try:
            # broadcast=False: every worker runs its own watcher, a control-file order would double it
            await state.reload_bundle(target, wait=True, broadcast=False)
        except ReloadBusy:
            continue  # an admin reload is running; look again at the next poll
        except ReloadFailed as exc:
            log.error("bundle %s refused, not retried until the pointer moves: %s", target, exc)
        last = target


# ---- command line: python -m service.bundle_watch {publish,unused} ---------------------------------
def served_versions(urls: Iterable[str], timeout: float = 5.0) -> set[str]:
    """``bundle_version`` of ``GET /v1/info`` at each base URL; an unreachable one raises (so nothing a
    silent pod still maps is ever called unused)."""
    import urllib.request

    out = set()
    for url in urls:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/info", timeout=timeout) as resp:
            out.add(str(json.loads(resp.read())["bundle_version"]))
    return out


def _dns_urls(spec: str) -> list[str]:
    """HOST:PORT -> one base URL per address HOST resolves to (a headless Service lists every pod)."""
    import socket

    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--dns wants HOST:PORT, got {spec!r}")
    addrs = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)})
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addrs]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shutil
    import sys

    p = argparse.ArgumentParser(
        prog="python -m service.bundle_watch",
        description="Publish bundle versions through a pointer symlink; list (or delete) the ones no worker serves.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="point POINTER at VERSION_DIR with one atomic rename")
    pub.add_argument("version_dir", type=Path)
    pub.add_argument("--pointer", type=Path, default=Path("/bundles/current"))
    unu = sub.add_parser("unused", help="version directories neither current nor served by any worker")
    unu.add_argument("--versions", type=Path, default=Path("/bundles/versions"))
    unu.add_argument("--pointer", type=Path, default=Path("/bundles/current"))
    unu.add_argument("--url", action="append", default=[], help="base URL of a worker/pod (repeat); asks its /v1/info")
    unu.add_argument("--dns", action="append", default=[], help="HOST:PORT resolving to every pod (a headless Service)")
    unu.add_argument("--delete", action="store_true", help="delete them (default: only list)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "publish":
            target = publish(args.version_dir, args.pointer)
            print(f"{args.pointer} -> {target} (version {bundle_version(target)})")
            return 0
        if not args.versions.is_dir():
            raise PublishError(f"{args.versions} is not a directory")
        urls = list(args.url) + [u for spec in args.dns for u in _dns_urls(spec)]
        if not urls:
            raise PublishError("say which workers serve: --url or --dns (without them every version would look unused)")
        served = served_versions(urls)
        unused = unused_versions(args.versions, args.pointer, served)
        print(f"served by {len(urls)} workers: {', '.join(sorted(served))}")
        for d in unused:
            print(f"{'deleting' if args.delete else 'unused'}: {d} (version {bundle_version(d)})")
            if args.delete:
                if d.is_symlink():
                    d.unlink()
                else:
                    shutil.rmtree(d)
        return 0
    except (PublishError, ValueError, OSError) as exc:
        print(f"bundle_watch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
