"""Dataset layer: loaders, registry, preprocessing, leave-one-out split, synthetic data.

Typical use::

    from lane_ray.config import DataConfig
    from lane_ray.data import load_dataset, write_prepared
    prepared = load_dataset(DataConfig(dataset="ml-100k"))
    write_prepared(prepared, "runs/default")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lane_ray.config import DataConfig
from lane_ray.data.loaders import RawDataset, load_path
from lane_ray.data.preprocess import PreparedDataset, dataset_stats, prepare
from lane_ray.data.registry import REGISTRY, resolve
from lane_ray.data.split import ItemIndex, LeaveOneOutSplit, sequence_batches
from lane_ray.errors import DataError
from lane_ray.io import read_parquet, write_json, write_parquet

# Bump when preprocessing changes what it writes, so cached outputs are rebuilt.
PREPARE_VERSION = "1"

__all__ = [
    "REGISTRY", "ItemIndex", "LeaveOneOutSplit", "PreparedDataset", "RawDataset", "dataset_stats",
    "load_dataset", "load_raw", "prepare", "prepared_is_current", "read_prepared", "sequence_batches",
    "write_prepared",
]


def load_raw(cfg: DataConfig) -> tuple[RawDataset, tuple[int, int]]:
    """Load the dataset named or pointed to by ``cfg.dataset``; also return its default k-core."""
    path = Path(cfg.dataset).expanduser()
    if cfg.format is not None or path.exists():
        return load_path(path, cfg, cfg.format), (0, 0)
    if cfg.dataset not in REGISTRY and ("/" in cfg.dataset or cfg.dataset.startswith(".")):
        raise DataError("dataset path not found", file=cfg.dataset, field="dataset")
    folder, spec = resolve(cfg.dataset, cfg)
    raw = load_path(folder, cfg, spec.format)
    raw.name = spec.name
    return raw, spec.default_kcore


def load_dataset(cfg: DataConfig) -> PreparedDataset:
    """Load and preprocess a dataset into the canonical tables."""
    raw, kcore = load_raw(cfg)
    return prepare(raw, cfg, default_kcore=kcore)


def source_fingerprint(cfg: DataConfig) -> str:
    """Hash of what determines prepared data: config, source files (path, size, mtime), code version."""
    h = hashlib.sha1()
    h.update(PREPARE_VERSION.encode())
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    path = Path(cfg.dataset).expanduser()
    if cfg.dataset in REGISTRY and not path.exists():
        try:
            folder, _ = resolve(cfg.dataset, cfg)
        except Exception:  # noqa: BLE001 - an unresolvable dataset is simply "not current"
            return "unresolved"
        path = folder
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if p.exists():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    if cfg.catalog:
        p = Path(cfg.catalog)
        if p.exists():
            h.update(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()


def data_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "data"


def write_prepared(prepared: PreparedDataset, run_dir: str | Path, cfg: DataConfig | None = None) -> dict[str, Any]:
    """Write ``data/interactions.parquet``, ``data/catalog.parquet`` (and ``data/user_ids.parquet`` when
    user ids were mapped) plus ``data/prepare.json``; each file atomically. Returns the summary written."""
    d = data_dir(run_dir)
    write_parquet(d / "interactions.parquet", prepared.interactions)
    write_parquet(d / "catalog.parquet", prepared.catalog)
    if prepared.user_ids is not None:
        write_parquet(d / "user_ids.parquet", prepared.user_ids)
    summary = {
        "dataset": prepared.name,
        "prepare_version": PREPARE_VERSION,
        "stats": prepared.stats(),
        "report": prepared.report,
        "config": cfg.model_dump(mode="json") if cfg is not None else None,
        "fingerprint": source_fingerprint(cfg) if cfg is not None else None,
    }
    write_json(d / "prepare.json", summary)  # written last: its presence marks a complete output
    return summary


def prepared_is_current(run_dir: str | Path, cfg: DataConfig) -> bool:
    """True when ``run_dir`` holds prepared data made from the same config and source files."""
    d = data_dir(run_dir)
    meta = d / "prepare.json"
    if not (meta.exists() and (d / "interactions.parquet").exists() and (d / "catalog.parquet").exists()):
        return False
    try:
        fp = json.loads(meta.read_text()).get("fingerprint")
    except (json.JSONDecodeError, OSError):
        return False
    return fp is not None and fp == source_fingerprint(cfg)


def read_prepared(run_dir: str | Path) -> PreparedDataset:
    """Read the canonical tables a ``prepare`` wrote into ``run_dir``."""
    d = data_dir(run_dir)
    meta = {}
    if (d / "prepare.json").exists():
        meta = json.loads((d / "prepare.json").read_text())
    user_ids = read_parquet(d / "user_ids.parquet") if (d / "user_ids.parquet").exists() else None
    return PreparedDataset(
        read_parquet(d / "interactions.parquet"), read_parquet(d / "catalog.parquet"),
        name=meta.get("dataset", d.parent.name), report=meta.get("report", {}), user_ids=user_ids,
    )
