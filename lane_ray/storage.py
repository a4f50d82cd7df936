"""Run directories on any pyarrow filesystem: a local folder by default, ``s3://``, ``gs://`` (or any URI
``pyarrow.fs.FileSystem.from_uri`` accepts, ``file://`` included) on a cluster.

A run whose ``run.out`` is a URI is staged: the driver works in a local folder (``run.stage_dir``, default
``$LANE_STAGE_DIR`` or ``~/.cache/lane_ray/stage/<hash of the URI>``), pulls the remote run into it first (so a
run resumes from what the remote holds), and pushes it back after every stage. A push uploads only files whose
size or modification time changed, each through a temporary object renamed into place (an object store creates
the final object in one step, so a reader never sees a partial file), and removes remote files the stage removed
(compacted parts); writes come from one driver per run directory. The part files Ray Data workers write go to
the remote folder directly (see :func:`remote_dir`), so workers on other nodes need no shared disk; the driver
pulls them when the dataset has been written. Ray Train checkpoints go to ``<URI>/ray_train`` (Ray Train's own
remote storage).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lane_ray.atomic import atomic_open, publish
from lane_ray.errors import DataError


def is_uri(path: str | os.PathLike[str] | None) -> bool:
    """True for ``scheme://...`` (s3, gs, file, hdfs, ...), False for a plain local path."""
    return path is not None and "://" in str(path)


def resolve_uri(uri: str) -> tuple[Any, str]:
    """``(filesystem, path inside it)`` for ``uri``; a clear error when pyarrow cannot open it."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise DataError(f"cannot open this storage URI: {exc}", file=redact(uri)) from None


def join_uri(uri: str, rel: str) -> str:
    """``uri`` with ``rel`` appended to its path, its query (``?endpoint_override=...``) kept at the end."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{rel.lstrip('/')}{sep}{query}" if rel not in ("", ".") else uri


def redact(uri: str) -> str:
    """``uri`` without credentials (``s3://key:secret@bucket`` -> ``s3://***@bucket``), for logs and errors."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


@contextlib.contextmanager
def atomic_object(fs: Any, dest: str) -> Iterator[Any]:
    """An output stream for ``dest`` on ``fs`` that writes a temporary object and moves it to ``dest`` when the block
    succeeds (an object store creates the final object in one step: a reader never sees a partial one)."""
    parent, name = posixpath.split(dest)
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(tmp) as out:
        yield out
    fs.move(tmp, dest)


def default_stage_dir(uri: str) -> Path:
    base = os.environ.get("LANE_STAGE_DIR") or Path.home() / ".cache" / "lane_ray" / "stage"
    return Path(base) / hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]


SYNC_STATE = ".lane_sync.json"
REMOTE_ONLY = ("ray_train/",)  # Ray Train writes its checkpoints there itself; the driver reads the best one


@dataclass
class RunStorage:
    """A remote run directory ``uri`` mirrored in the local folder ``local``. What was last copied either way is
    kept in ``local/.lane_sync.json`` (path -> local size, local mtime, remote mtime), so a pull or push copies
    only what changed on either side since."""

    uri: str
    local: Path
    fs: Any = field(init=False, repr=False)
    root: str = field(init=False)
    state: dict[str, list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import json

        base, sep, query = self.uri.partition("?")
        self.uri = base.rstrip("/") + sep + query
        self.local = Path(self.local)
        self.fs, self.root = resolve_uri(self.uri)
        self.root = self.root.rstrip("/")
        try:
            self.state = json.loads((self.local / SYNC_STATE).read_text())
        except (OSError, ValueError):
            self.state = {}

    def _save_state(self) -> None:
        import json

        self.local.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.local / SYNC_STATE) as fh:
            fh.write(json.dumps(self.state))

    # ------------------------------------------------------------------ listing
    def _remote_files(self, sub: str = "") -> dict[str, tuple[int, int]]:
        """``{relative path: (size, mtime ns)}`` of the files under ``root/sub`` (temporaries excluded)."""
        import pyarrow.fs as pafs

        base = posixpath.join(self.root, sub) if sub else self.root
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise DataError(f"cannot list the run directory: {exc}", file=redact(self.uri)) from None
        out = {}
        for info in infos:
            if info.type == pafs.FileType.File:
                rel = posixpath.relpath(info.path, self.root)
                if not _is_private(rel) and not rel.startswith(REMOTE_ONLY):
                    out[rel] = (int(info.size), int(info.mtime_ns or 0))
        return out

    def _local_files(self, sub: str = "") -> dict[str, tuple[int, int]]:
        base = self.local / sub
        out = {}
        if base.exists():
            for p in base.rglob("*"):
                if p.is_file():
                    rel = p.relative_to(self.local).as_posix()
                    if not _is_private(rel):
                        st = p.stat()
                        out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def _remote_mtime(self, rel: str) -> int:
        return int(self.fs.get_file_info(posixpath.join(self.root, rel)).mtime_ns or 0)

    # ------------------------------------------------------------------ transfer
    def pull(self, sub: str = "") -> int:
        """Copy remote files under ``sub`` that changed remotely since the last sync (or were never copied), and
        remove local files that were synced before and are gone remotely; returns the number copied."""
        remote, local = self._remote_files(sub), self._local_files(sub)
        n = 0
        for rel, (_size, rmtime) in remote.items():
            known = self.state.get(rel)
            if known and rel in local and list(local[rel]) == known[:2] and known[2] == rmtime:
                continue
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
            with self.fs.open_input_stream(posixpath.join(self.root, rel)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
            publish(tmp, dest)
            st = dest.stat()
            self.state[rel] = [st.st_size, st.st_mtime_ns, rmtime]
            n += 1
        for rel in set(local) - set(remote):
            if rel in self.state:  # copied before and removed remotely since: mirror the removal
                (self.local / rel).unlink(missing_ok=True)
                self.state.pop(rel)
        self._save_state()
        return n

    def push(self, sub: str = "") -> dict[str, int]:
        """Upload local files under ``sub`` changed since the last sync (data files first, then the manifests
        and JSON files describing them), then remove remote files no longer present locally; returns
        ``{"uploaded", "removed"}``."""
        local, remote = self._local_files(sub), self._remote_files(sub)
        up = 0
        for rel, sig in sorted(local.items(), key=lambda kv: _manifest_last(kv[0])):
            known = self.state.get(rel)
            if known and known[:2] == list(sig) and rel in remote and remote[rel][1] == known[2]:
                continue
            self._upload(rel)
            self.state[rel] = [*sig, self._remote_mtime(rel)]
            up += 1
        removed = 0
        for rel in set(remote) - set(local):
            if rel not in self.state:  # not ours to remove: parts workers just wrote, Ray Train's checkpoints
                continue
            try:
                self.fs.delete_file(posixpath.join(self.root, rel))
            except FileNotFoundError:
                pass
            self.state.pop(rel, None)
            removed += 1
        self._save_state()
        return {"uploaded": up, "removed": removed}

    def _upload(self, rel: str) -> None:
        with open(self.local / rel, "rb") as src, atomic_object(self.fs, posixpath.join(self.root, rel)) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)

    def uri_of(self, local_path: str | Path) -> str | None:
        """The remote URI of a path inside the staged folder, or None outside it."""
        try:
            rel = Path(local_path).resolve().relative_to(self.local.resolve())
        except ValueError:
            return None
        return join_uri(self.uri, rel.as_posix())


def _is_private(rel: str) -> bool:
    """Temporaries of unfinished writes and the sync state: never copied either way."""
    name = posixpath.basename(rel)
    return (name.startswith(".") and name.endswith(".tmp")) or name == SYNC_STATE


def _manifest_last(rel: str) -> tuple[int, str]:
    """Upload order: data files before the manifests and progress/timing files that describe them."""
    name = posixpath.basename(rel)
    return (1 if name.startswith("_") or name.endswith(".json") else 0, rel)


_ACTIVE: list[RunStorage] = []


def activate(storage: RunStorage) -> None:
    _ACTIVE.append(storage)


def remote_dir(local_path: str | Path) -> str | None:
    """Where Ray workers should write the parts of ``local_path``: its remote URI when the run is staged from a
    remote directory (workers on other nodes cannot see the driver's disk), else None (write locally)."""
    for s in _ACTIVE:
        uri = s.uri_of(local_path)
        if uri is not None:
            return uri
    return None


def pull_dir(local_path: str | Path) -> None:
    """After workers wrote parts to :func:`remote_dir`, copy them into the staged folder."""
    for s in _ACTIVE:
        uri = s.uri_of(local_path)
        if uri is not None:
            s.pull(Path(local_path).resolve().relative_to(s.local.resolve()).as_posix())
            return


def push_all() -> None:
    """Push every active staged run (called when a stage ends)."""
    for s in _ACTIVE:
        s.push()


def push_file(local_path: str | Path) -> None:
    """Upload one file of a staged run now (the progress view between stages); best-effort."""
    for s in _ACTIVE:
        uri = s.uri_of(local_path)
        if uri is not None:
            rel = Path(local_path).resolve().relative_to(s.local.resolve()).as_posix()
            try:
                s._upload(rel)
            except OSError:
                pass
            return


def open_run(path: str, stage_dir: str | None = None) -> str:
    """The local folder to work in for run directory ``path``: ``path`` itself made absolute (Ray workers do not
    share the driver's working directory), or, for a URI, its staging folder (pulled now, pushed after every
    stage and when the command ends: :func:`close_all`)."""
    if not is_uri(path):
        return str(Path(path).expanduser().resolve())
    from lane_ray.console import log

    storage = RunStorage(path, Path(stage_dir) if stage_dir else default_stage_dir(path))
    n = storage.pull()
    log(f"storage: {redact(storage.uri)} staged in {storage.local} ({n} files pulled)")
    activate(storage)
    return str(storage.local)


def close_all() -> None:
    """Push and forget every staged run (end of a command, also a failed one: what finished is kept remotely)."""
    try:
        push_all()
    finally:
        _ACTIVE.clear()


def read_text(path: str) -> str:
    """A small text file from a local path or a URI."""
    if not is_uri(path):
        return Path(path).read_text()
    fs, p = resolve_uri(path)
    try:
        with fs.open_input_stream(p) as fh:
            return fh.read().decode()
    except FileNotFoundError:
        raise FileNotFoundError(path) from None
