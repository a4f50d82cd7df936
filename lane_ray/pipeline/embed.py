"""Ray Data stage: a Parquet table of texts -> embeddings Parquet, incremental and resumable.

    catalog.parquet (item_id, title) ──read──► keep rows not embedded yet ──► encoder actors ──► part files

Output: a directory (``item_embeddings.parquet/``) of ``part-<uuid>.parquet`` files with the key columns,
``text_sha1`` and ``embedding: fixed_size_list<float32>[dim]`` (the encoder id in the file metadata), plus
``_manifest.json`` (counts and settings) and ``_rejects.parquet`` (rows not embedded, with the reason).

How it stays incremental, resumable and duplicate-free:

1. *Plan* (driver, streaming): every input row gets a key from its key columns and its text's SHA-1; keys
   already present in the output with the same encoder are not embedded again. Changed titles have new
   keys, so only they (and new rows) are embedded.
2. *Embed* (Ray Data): ``read_parquet`` → filter to the planned keys → ``map_batches`` with a callable
   encoder class on an actor pool (``concurrency=(min, max)``, ``num_gpus`` per actor when the cluster has
   GPUs) → a datasink that writes each block to a temporary name and renames it: a part file exists whole
   or not at all, so a killed job leaves only finished parts, and a re-run skips them.
3. *Compact*: rows whose key is no longer in the input (old titles, removed items) and repeated keys (a
   retried task) are removed from the parts they are in, each part rewritten atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lane_ray.config import EmbedConfig, RayConfig
from lane_ray.errors import DataError
from lane_ray.io import parquet_files, write_json, write_parquet
from lane_ray.pipeline.sink import PART_PREFIX, finish_parts, make_part_sink
from lane_ray.progress import NewEntries, RssSampler, expect, log
from lane_ray.text.rows import batch_keys, clean_texts, id64, key64

ENCODER_META = b"lane.encoder"
DIM_META = b"lane.dim"


@dataclass(frozen=True)
class TextTable:
    """Which columns of the input identify a row and which one holds its text."""

    key_columns: tuple[str, ...] = ("item_id",)
    text_column: str = "title"


CATALOG_TEXTS = TextTable(("item_id",), "title")


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    rows: int
    current: np.ndarray  # uint64 keys the output must hold when done (sorted, unique)
    todo: np.ndarray  # uint64 keys to embed now (sorted)
    reused: int
    counts: dict[str, int]
    rejects: pa.Table


def _input_dataset(path: Path, spec: TextTable) -> pads.Dataset:
    files = parquet_files(path)
    try:
        ds = pads.dataset([str(f) for f in files], format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"not a readable Parquet file (truncated or corrupt): {exc}", file=path) from None
    for col in (*spec.key_columns, spec.text_column):
        if col not in ds.schema.names:
            raise DataError(f"missing column (found: {', '.join(ds.schema.names)})", file=path, field=col)
        if col in spec.key_columns and not pa.types.is_integer(ds.schema.field(col).type):
            raise DataError(f"key column must be integer, found {ds.schema.field(col).type}", file=path, field=col)
    return ds


def _existing_parts(out: Path, enc_id: str, counts: dict[str, int]) -> list[Path]:
    """Finished parts made by this encoder; leftovers of killed writes and other encoders' parts are removed."""
    if not out.exists():
        return []
    for tmp in out.glob(f".{PART_PREFIX}*"):
        tmp.unlink()  # a write that never finished: its rows are simply embedded again
        counts["discarded_unfinished_writes"] += 1
    keep = []
    for part in sorted(out.glob(f"{PART_PREFIX}*.parquet")):
        try:
            meta = pq.read_schema(part).metadata or {}
        except (pa.ArrowInvalid, OSError):
            part.unlink()
            counts["discarded_corrupt_parts"] += 1
            continue
        if meta.get(ENCODER_META, b"").decode() != enc_id:
            counts["discarded_other_encoder_rows"] += pq.read_metadata(part).num_rows
            part.unlink()
            continue
        keep.append(part)
    return keep


def _part_keys(part: Path, spec: TextTable) -> np.ndarray:
    t = pq.read_table(part, columns=[*spec.key_columns, "text_sha1"])
    return key64([t[c].to_numpy() for c in spec.key_columns], t["text_sha1"].to_pylist())


def _stream_batches(ds: pads.Dataset, columns: list[str], batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The dataset's rows, one file and one batch at a time, decoded into the system allocator.

    Measured on 1M synthetic titles: the dataset scanner's read-ahead held whole row groups (Arrow pool peak
    65 MB vs 10 MB at 100k) and the default mimalloc pool kept the freed pages, so the planner's RSS grew
    ~4x faster than the row count. Reading file by file without read-ahead, into the system pool (which
    returns freed memory), keeps the planner's own memory at the 16 bytes per row it really needs."""
    pool, previous = pa.system_memory_pool(), pa.default_memory_pool()
    pa.set_memory_pool(pool)  # buffers remember their pool, so restoring the default later is safe
    try:
        for path in ds.files:
            pf = pq.ParquetFile(path, pre_buffer=False)
            yield from pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False)
            pool.release_unused()
    finally:
        pa.set_memory_pool(previous)


def plan(input_path: Path, out: Path, spec: TextTable, enc_id: str, max_chars: int) -> Plan:
    counts = {"null_text": 0, "empty_text": 0, "invalid_utf8": 0, "truncated": 0, "duplicate_key": 0,
              "discarded_unfinished_writes": 0, "discarded_corrupt_parts": 0, "discarded_other_encoder_rows": 0}
    ds = _input_dataset(input_path, spec)
    ids, keys, valid = [], [], []
    reject_keys: dict[str, list] = {c: [] for c in spec.key_columns}
    reject_reasons: list[str] = []
    for batch in _stream_batches(ds, [*spec.key_columns, spec.text_column]):
        if batch.num_rows == 0:
            continue
        key_cols = [batch.column(c).to_numpy(zero_copy_only=False) for c in spec.key_columns]
        if any(batch.column(c).null_count for c in spec.key_columns):
            raise DataError("key column has NULL values", file=input_path,
                            field=next(c for c in spec.key_columns if batch.column(c).null_count))
        cb = clean_texts(batch.column(spec.text_column), max_chars)
        for k in ("null_text", "empty_text", "invalid_utf8", "truncated"):
            counts[k] += cb.counts[k]
        ids.append(id64(key_cols))
        keys.append(batch_keys(key_cols, cb))
        valid.append(cb.valid)
        for i in np.flatnonzero(~cb.valid):
            for c, col in zip(spec.key_columns, key_cols, strict=True):
                reject_keys[c].append(int(col[i]))
            reject_reasons.append(cb.reasons[i])  # type: ignore[arg-type]
        # keep key columns of invalid rows only; valid rows are found again by key
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    all_valid = np.concatenate(valid) if valid else np.zeros(0, bool)
    ids = keys = valid = []  # noqa: F841 - drop the per-batch arrays before the set operations
    first = np.zeros(all_ids.size, dtype=bool)
    first[np.unique(all_ids, return_index=True)[1]] = True
    dup = ~first
    counts["duplicate_key"] = int(dup.sum())
    if dup.any():
        # name the duplicate rows in the rejects file: read their keys back (rare path)
        dup_rows = np.flatnonzero(dup)
        table = ds.to_table(columns=list(spec.key_columns))
        for c in spec.key_columns:
            reject_keys[c].extend(table[c].to_numpy()[dup_rows].tolist())
        reject_reasons.extend(["duplicate_key"] * dup_rows.size)
    current = np.unique(all_keys[all_valid & first])
    existing = [_part_keys(p, spec) for p in _existing_parts(out, enc_id, counts)]
    have = np.unique(np.concatenate(existing)) if existing else np.zeros(0, np.uint64)
    todo = np.setdiff1d(current, have, assume_unique=True)
    rejects = pa.table({**{c: pa.array(v, pa.int64()) for c, v in reject_keys.items()},
                        "reason": pa.array(reject_reasons, pa.string())})
    return Plan(int(all_ids.size), current, todo, int(current.size - todo.size), counts, rejects)


# ---------------------------------------------------------------------------------------- Ray parts


def select_rows(batch: pa.Table, todo: np.ndarray, key_columns: tuple[str, ...], text_column: str,
                max_chars: int) -> pa.Table:
    """Rows of ``batch`` whose key is in ``todo``, as (keys..., text, text_sha1). Runs in Ray tasks."""
    cb = clean_texts(batch.column(text_column), max_chars)
    keys = [batch.column(c).to_numpy(zero_copy_only=False) for c in key_columns]
    k64 = batch_keys(keys, cb)
    pos = np.minimum(np.searchsorted(todo, k64), max(todo.size - 1, 0))
    keep = cb.valid & (todo.size > 0) & (todo[pos] == k64) if todo.size else np.zeros(batch.num_rows, bool)
    idx = np.flatnonzero(keep)
    return pa.table({
        **{c: pa.array(k[idx], pa.int64()) for c, k in zip(key_columns, keys, strict=True)},
        "text": pa.array([cb.texts[i] for i in idx], pa.string()),
        "text_sha1": pa.array([cb.sha1[i] for i in idx], pa.string()),
    })


def _select_rows_task(batch: pa.Table, todo_ref: Any, **kwargs: Any) -> pa.Table:
    import ray

    # map_batches does not resolve ObjectRefs in fn_kwargs; the get is a zero-copy read from the object store.
    return select_rows(batch, ray.get(todo_ref), **kwargs)


class EncodeBatch:
    """Callable class for ``map_batches``: loads the encoder once per actor, embeds each batch."""

    def __init__(self, model: str, device: str, batch_size: int, fp16: bool | None, num_threads: int | None,
                 key_columns: tuple[str, ...], niceness: int | None = None) -> None:
        from lane_ray.pipeline.cluster import set_niceness
        from lane_ray.text import TextEncoder

        set_niceness(niceness)

        self.encoder = TextEncoder(model, device=device, batch_size=batch_size, fp16=fp16, num_threads=num_threads)
        self.key_columns = key_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        vecs = self.encoder.encode(batch.column("text").to_pylist())
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
        return pa.table({**{c: batch.column(c) for c in self.key_columns}, "text_sha1": batch.column("text_sha1"),
                         "embedding": emb})


def _pool(cfg: EmbedConfig, resources: dict[str, float]) -> dict[str, Any]:
    gpus = resources.get("GPU", 0)
    use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus >= cfg.gpus_per_actor)
    cpus = resources.get("CPU", 1)
    if use_gpu:
        max_actors = cfg.max_actors or max(1, int(gpus // cfg.gpus_per_actor))
        return {"use_gpu": True, "max": max_actors, "min": min(cfg.min_actors, max_actors), "threads": None,
                "num_gpus": cfg.gpus_per_actor, "num_cpus": cfg.cpus_per_actor, "device": "cuda"}
    # Keep one CPU for the read/filter/write tasks, which must be able to run beside the actors.
    max_actors = cfg.max_actors or max(1, int((cpus - 1) // cfg.cpus_per_actor))
    threads = cfg.threads_per_actor or max(1, int(cpus // max_actors))
    return {"use_gpu": False, "max": max_actors, "min": min(cfg.min_actors, max_actors), "threads": threads,
            "num_gpus": 0, "num_cpus": cfg.cpus_per_actor, "device": "cpu"}


def _run_ray(input_path: Path, out: Path, spec: TextTable, todo: np.ndarray, rows: int, cfg: EmbedConfig,
             ray_cfg: RayConfig, enc_id: str, dim: int) -> dict[str, Any]:
    import ray

    from lane_ray.pipeline.cluster import init_ray

    resources = init_ray(ray_cfg)
    pool = _pool(cfg, resources)
    n_blocks = max(2 * pool["max"], math.ceil(rows / cfg.rows_per_block))
    log(f"embed: {todo.size:,} texts on {pool['min']}..{pool['max']} {'GPU' if pool['use_gpu'] else 'CPU'} "
        f"actor(s)" + (f" x {pool['threads']} threads" if pool["threads"] else "") + f", {n_blocks} blocks")
    t0 = time.perf_counter()
    ds = ray.data.read_parquet([str(p) for p in parquet_files(input_path)], override_num_blocks=n_blocks)
    ds = ds.select_columns([*spec.key_columns, spec.text_column])  # pushed down into the Parquet read
    ds = ds.map_batches(_select_rows_task, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                        fn_kwargs={"todo_ref": ray.put(todo), "key_columns": spec.key_columns,
                                   "text_column": spec.text_column, "max_chars": cfg.max_chars})
    # Blocks of one encoder batch each, so every actor of the pool gets work (a Parquet file often reads as
    # one block); this repartition streams, it does not materialise the dataset.
    ds = ds.repartition(target_num_rows_per_block=cfg.rows_per_batch)
    ds = ds.map_batches(
        EncodeBatch, batch_format="pyarrow", batch_size=cfg.rows_per_batch, concurrency=(pool["min"], pool["max"]),
        num_cpus=pool["num_cpus"], num_gpus=pool["num_gpus"],
        fn_constructor_kwargs={"model": cfg.model, "device": pool["device"], "batch_size": cfg.batch_size,
                               "fp16": cfg.fp16, "num_threads": pool["threads"], "key_columns": spec.key_columns,
                               "niceness": cfg.actor_niceness},
    )
    ds.write_datasink(make_part_sink(out, {ENCODER_META: enc_id.encode(), DIM_META: str(dim).encode()}))
    finish_parts(out)
    return {"seconds": round(time.perf_counter() - t0, 3), "actors_max": pool["max"], "threads": pool["threads"],
            "use_gpu": pool["use_gpu"], "blocks": n_blocks}


# ------------------------------------------------------------------------------------------ compact


def compact(out: Path, spec: TextTable, current: np.ndarray) -> dict[str, int]:
    """Remove rows whose key is not in ``current`` and repeated keys; rewrite touched parts atomically."""
    parts = sorted(out.glob(f"{PART_PREFIX}*.parquet"))
    keys = [_part_keys(p, spec) for p in parts]
    stats = {"removed_stale": 0, "removed_duplicates": 0}
    if not parts:
        return stats
    flat = np.concatenate(keys)
    first = np.zeros(flat.size, dtype=bool)
    first[np.unique(flat, return_index=True)[1]] = True
    pos = np.minimum(np.searchsorted(current, flat), max(current.size - 1, 0))
    live = (current[pos] == flat) if current.size else np.zeros(flat.size, bool)
    stats["removed_stale"] = int((~live).sum())
    stats["removed_duplicates"] = int((live & ~first).sum())
    keep = live & first
    start = 0
    for part, k in zip(parts, keys, strict=True):
        m = keep[start : start + k.size]
        start += k.size
        if m.all():
            continue
        if not m.any():
            part.unlink()
            continue
        table = pq.read_table(part)
        write_parquet(part, table.filter(pa.array(m)))
    return stats


# --------------------------------------------------------------------------------------------- API


def embed_texts(input_path: str | Path, out_path: str | Path, cfg: EmbedConfig, ray_cfg: RayConfig,
                spec: TextTable = CATALOG_TEXTS) -> dict[str, Any]:
    """Embed the texts of ``input_path`` into ``out_path`` (see the module docstring); returns the manifest."""
    from lane_ray.text import encoder_id

    input_path, out = Path(input_path), Path(out_path)
    if out.exists() and not out.is_dir():
        raise DataError("output exists and is a file; give a directory name such as item_embeddings.parquet",
                        file=out)
    t0 = time.perf_counter()
    enc_id = encoder_id(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    with RssSampler() as rss:
        p = plan(input_path, out, spec, enc_id, cfg.max_chars)
        log(f"embed: {p.rows:,} rows, {p.current.size:,} distinct texts: {p.reused:,} already embedded, "
            f"{p.todo.size:,} to embed, {len(p.rejects):,} rejected")
        run: dict[str, Any] = {"seconds": 0.0}
        dim = _model_dim(cfg.model)
        if p.todo.size:
            expect(int(p.todo.size), NewEntries(out), "texts")
            run = _run_ray(input_path, out, spec, p.todo, p.rows, cfg, ray_cfg, enc_id, dim)
        comp = compact(out, spec, p.current)
    rows_out = sum(pq.read_metadata(f).num_rows for f in out.glob(f"{PART_PREFIX}*.parquet"))
    if rows_out != p.current.size:
        raise DataError(f"expected {p.current.size} embeddings after the run, found {rows_out}; re-run to "
                        "complete", file=out)
    rejects_path = out / "_rejects.parquet"
    if len(p.rejects):
        write_parquet(rejects_path, p.rejects)
    elif rejects_path.exists():
        rejects_path.unlink()
    manifest = {
        "encoder": enc_id, "model": cfg.model, "dim": dim, "input": str(input_path),
        "key_columns": list(spec.key_columns), "text_column": spec.text_column,
        "input_rows": p.rows, "rows": rows_out, "embedded_now": int(p.todo.size), "reused": p.reused,
        "rejected": int(len(p.rejects)), "counts": {**p.counts, **comp},
        "seconds": round(time.perf_counter() - t0, 3), "embed_seconds": run["seconds"],
        "driver_peak_rss_mb": rss.peak_mb, "ray": {k: v for k, v in run.items() if k != "seconds"},
    }
    write_json(out / "_manifest.json", manifest)
    return manifest


def _model_dim(model: str) -> int:
    from lane_ray.text import locate_model

    folder = locate_model(model)
    dense = sorted(folder.glob("*Dense*/config.json"))
    if dense:  # a Dense head sets the output size
        return int(json.loads(dense[-1].read_text())["out_features"])
    conf_file = folder / "config.json"
    conf = json.loads(conf_file.read_text()) if conf_file.exists() else {}
    for key in ("hidden_size", "d_model", "dim"):
        if key in conf:
            return int(conf[key])
    from lane_ray.text import TextEncoder  # no size in the configs: ask the model

    return TextEncoder(model, device="cpu").dim


def read_embeddings(path: str | Path) -> pa.Table:
    """All rows of an embeddings output (a part directory or one file)."""
    from lane_ray.io import read_parquet

    return read_parquet(path)


__all__ = ["CATALOG_TEXTS", "TextTable", "compact", "embed_texts", "plan", "read_embeddings", "select_rows"]
