"""Atomic writes and checksums shared by every writer of datasets, runs and bundles.

The operator-facing contract: outputs are written to a temporary path and renamed into place,
so a crash never leaves a half-written directory that looks complete. Nothing here deletes a directory
unimatch did not write: replacing an existing output needs that output's manifest (the "marker" file,
e.g. ``dataset.json`` or ``manifest.json``) to be there and to be ours (``check_output_dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class OutputDirError(FileExistsError):
    """``--out`` names a directory that holds files unimatch did not write (or ours, without ``--force``)."""


def is_ours(directory: Path, marker: str) -> bool:
    """True when ``directory/marker`` is a manifest unimatch wrote: a JSON object with ``format_version``.

    The test is deliberately narrow: a user's own ``manifest.json`` (any JSON without our key, or not
    JSON at all) does not make their directory ours to delete.
    """
    path = Path(directory) / marker
    if path.is_symlink() or not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and "format_version" in doc


def check_output_dir(final: Path, *, marker: str, force: bool) -> None:
    """Refuse an output directory we could only fill by deleting someone else's files.

    Missing or empty: fine. Holding a previous output of ours (``marker`` is our manifest): replaced
    only with ``force``. Anything else (a file, a symlink, a directory with other files): refused,
    ``force`` or not. Called by the CLI before any work starts, so a refusal costs nothing.

    Raises:
        OutputDirError: with a one-line reason that names the way out.
    """
    final = Path(final)
    if final.is_symlink():
        raise OutputDirError(f"{final}: is a symbolic link; give the real directory as --out")
    if not final.exists():
        return
    if not final.is_dir():
        raise OutputDirError(f"{final}: exists and is not a directory; choose another --out")
    if not any(final.iterdir()):
        return
    if not is_ours(final, marker):
        raise OutputDirError(
            f"{final}: not empty and not written by unimatch (no {marker}); refusing to replace it, "
            "even with --force: choose another --out or empty it yourself"
        )
    if not force:
        raise OutputDirError(f"{final}: holds an earlier unimatch output; pass --force to replace it")


@contextmanager
def atomic_directory(final: Path, *, overwrite: bool = True, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success rename it to ``final``.

    On an exception the temporary directory is removed and ``final`` is left untouched. An existing
    ``final`` is replaced only after the new one is complete (rename old aside, rename new in,
    delete old), so readers never see a mix of old and new files.

    Args:
        final: the directory to create or replace.
        overwrite: False refuses any existing ``final``.
        marker: our manifest's file name; when given, a non-empty ``final`` without it (see ``is_ours``)
            is never replaced: checked before the work and again just before the swap.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    if marker is not None:
        check_output_dir(final, marker=marker, force=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes the directory 0700; a bundle or dataset must be readable by the service's user.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if marker is not None:
        try:  # someone may have put files there while we worked
            check_output_dir(final, marker=marker, force=True)
        except OutputDirError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files 0600; keep the usual umask-based mode
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_npy(path: Path, array: Any) -> None:
    """``np.save`` to ``path`` through a temporary file in the same directory and rename."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _umask() -> int:
    """The process umask (reading it requires setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
