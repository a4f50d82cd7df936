"""The one way LANE-Ray puts a file or a folder in place: write it under a temporary name in the destination's
folder, fsync it, rename it onto the destination, then fsync the folder, so that after a crash (process or
machine) the destination holds either the old content or the new, never a part, and a finished rename is not
lost with the page cache. Every local writer goes through :func:`publish` (directly or by :func:`atomic_path`);
object stores get their own one-step move in ``lane_ray/storage.py`` (``atomic_object``).

Standard library only: importing it costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(folder: str | Path) -> None:
    """Make the entries of ``folder`` (a rename into it, a new file) durable. A no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a folder and then each folder, deepest first (one walk)."""
    if not path.is_dir():
        _fsync_file(path)
        return
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def publish(tmp: str | Path, dest: str | Path) -> Path:
    """Move the finished temporary file or folder ``tmp`` onto ``dest`` (same filesystem): fsync its content,
    rename, fsync the destination's folder. A folder replaces only a missing or empty ``dest`` (``os.replace``
    semantics: otherwise ``OSError``)."""
    tmp, dest = Path(tmp), Path(dest)
    _fsync_tree(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return dest


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it is published onto ``path``
    (:func:`publish`); when it fails the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield tmp_path
        publish(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` atomically when the block succeeds."""
    with atomic_path(path) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kwargs) as fh:
            yield fh


__all__ = ["atomic_open", "atomic_path", "fsync_dir", "publish"]
