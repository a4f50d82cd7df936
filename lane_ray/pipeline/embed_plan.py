"""The plan of the embedding stage (:mod:`lane_ray.pipeline.embed`): which input rows need embedding.

Every input row gets a key from its key columns and its text's SHA-1; keys already present in the output with the
same encoder are not embedded again. Rows are spilled to disk in buckets by key columns and planned one bucket at a
time, so the driver's memory does not grow with the catalogue. :func:`select_rows` is the filter the Ray tasks
apply to the input with the plan's key list.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lane_ray.errors import DataError
from lane_ray.io import parquet_files
from lane_ray.pipeline.sink import PART_PREFIX
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
#
# The plan never holds all keys at once: rows are spilled to bucket files by the hash of their key columns
# (a repeated key always lands in the same bucket) and each bucket is planned on its own, so the driver's
# memory is bounded by one bucket (``embed.plan_bucket_rows``), not by the catalogue. The spill files live in
# a temporary folder (about 40 bytes per input row on disk) that is removed when the stage ends.

MAX_BUCKETS = 256  # open spill files at once; beyond MAX_BUCKETS * plan_bucket_rows rows, buckets grow


def _bucket_bits(rows: int, bucket_rows: int) -> int:
    bits = 0
    while (rows >> bits) > bucket_rows and (1 << bits) < MAX_BUCKETS:
        bits += 1
    return bits


def _bucket_of(ids: np.ndarray, bits: int) -> np.ndarray:
    return (ids >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(ids.size, np.int64)


class Spill:
    """Append-only binary files of fixed-size records, one per bucket."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, bits: int) -> None:
        self.paths = [folder / f"{name}-{b:03d}.bin" for b in range(1 << bits)]
        self.dtype, self.bits = dtype, bits
        self._files = [open(p, "wb") for p in self.paths]  # noqa: SIM115 - closed in close()

    def add(self, ids: np.ndarray, records: np.ndarray) -> None:
        bucket = _bucket_of(ids, self.bits)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange((1 << self.bits) + 1))
        for b in range(1 << self.bits):
            if bounds[b + 1] > bounds[b]:
                records[order[bounds[b] : bounds[b + 1]]].tofile(self._files[b])

    def close(self) -> None:
        for f in self._files:
            f.close()

    def load(self, b: int) -> np.ndarray:
        return np.fromfile(self.paths[b], dtype=self.dtype)


@dataclass(frozen=True)
class KeyFilter:
    """Which planned rows Ray tasks embed: ``keep`` (embed keys in ``keys``) or ``skip`` (embed valid keys not in
    ``keys``), whichever list is shorter. ``keys`` holds one sorted segment per bucket (``offsets``)."""

    mode: str
    keys: np.ndarray
    offsets: np.ndarray
    bits: int

    def contains(self, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(keys.size, dtype=bool)
        bucket = _bucket_of(ids, self.bits)
        for b in np.unique(bucket):
            seg = self.keys[self.offsets[b] : self.offsets[b + 1]]
            if seg.size == 0:
                continue
            rows = np.flatnonzero(bucket == b)
            pos = np.minimum(np.searchsorted(seg, keys[rows]), seg.size - 1)
            found[rows] = seg[pos] == keys[rows]
        return found

    def wanted(self, ids: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        hit = self.contains(ids, keys)
        return valid & (hit if self.mode == "keep" else ~hit)


FILTER_LIST = {"keep": "todo", "skip": "skip"}  # KeyFilter mode -> the plan's key list it ships


@dataclass
class Plan:
    rows: int
    n_current: int  # distinct keys the output must hold when done
    n_todo: int  # keys to embed now
    reused: int
    counts: dict[str, int]
    rejects: pa.Table
    bits: int  # buckets = 2 ** bits
    folder: Path  # spill folder: current-<b>.npy (sorted keys per bucket), <filter_mode>.npy + offsets.npy
    filter_mode: str = "keep"

    def current(self, b: int) -> np.ndarray:
        return np.load(self.folder / f"current-{b:03d}.npy")

    def key_filter(self) -> KeyFilter:
        """The filter for Ray tasks; its key array is memory-mapped, so ray.put copies it from the page cache."""
        keys = np.load(self.folder / f"{FILTER_LIST[self.filter_mode]}.npy", mmap_mode="r")
        return KeyFilter(self.filter_mode, keys, np.load(self.folder / "offsets.npy"), self.bits)


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


PART_ROW = np.dtype([("id", np.uint64), ("key", np.uint64), ("part", np.int32), ("row", np.int32)])


def spill_parts(parts: list[Path], spec: TextTable, folder: Path, bits: int) -> Spill:
    """Keys of every row of ``parts``, bucketed, with where the row is (part index, row index)."""
    spill = Spill(folder, "parts", PART_ROW, bits)
    try:
        for i, part in enumerate(parts):
            t = pq.read_table(part, columns=[*spec.key_columns, "text_sha1"])
            cols = [t[c].to_numpy() for c in spec.key_columns]
            rec = np.empty(t.num_rows, PART_ROW)
            rec["id"] = id64(cols)
            rec["key"] = key64(cols, t["text_sha1"].to_pylist())
            rec["part"], rec["row"] = i, np.arange(t.num_rows)
            spill.add(rec["id"], rec)
    finally:
        spill.close()
    return spill


def _stream_batches(ds: pads.Dataset, columns: list[str], batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The dataset's rows, one file and one batch at a time, decoded into the system allocator.

    Measured on 1M synthetic titles: the dataset scanner's read-ahead held whole row groups (Arrow pool peak
    65 MB vs 10 MB at 100k) and the default mimalloc pool kept the freed pages, so the planner's RSS grew
    ~4x faster than the row count. Reading file by file without read-ahead, into the system pool (which
    returns freed memory), keeps the planner's memory bounded by one batch plus one bucket."""
    pool, previous = pa.system_memory_pool(), pa.default_memory_pool()
    pa.set_memory_pool(pool)  # buffers remember their pool, so restoring the default later is safe
    try:
        for path in ds.files:
            pf = pq.ParquetFile(path, pre_buffer=False)
            yield from pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False)
            pool.release_unused()
    finally:
        pa.set_memory_pool(previous)


def _join_segments(folder: Path, name: str, sizes: list[int]) -> None:
    """Join the per-bucket sorted key files ``<name>-<b>.npy`` into one ``<name>.npy`` plus ``offsets.npy``,
    through a memory map (the joined array never sits in the driver's own memory)."""
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes)
    out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint64, shape=(int(offsets[-1]),))
    for b, lo in enumerate(offsets[:-1]):
        seg = np.load(folder / f"{name}-{b:03d}.npy")
        out[lo : lo + seg.size] = seg
    out.flush()
    del out
    np.save(folder / "offsets.npy", offsets)


def _plan_batch(batch: pa.RecordBatch, start: int, spec: TextTable, max_chars: int, input_path: Path,
                row_t: np.dtype, spill: Spill, counts: dict[str, int], reject_keys: list[np.ndarray],
                reject_reasons: list[str]) -> int:
    """Spill one input batch's rows (key hashes, validity, position); collect its rejects. Returns its rows."""
    if batch.num_rows == 0:
        return 0
    if any(batch.column(c).null_count for c in spec.key_columns):
        raise DataError("key column has NULL values", file=input_path,
                        field=next(c for c in spec.key_columns if batch.column(c).null_count))
    key_cols = [batch.column(c).to_numpy(zero_copy_only=False) for c in spec.key_columns]
    cb = clean_texts(batch.column(spec.text_column), max_chars)
    for k in ("null_text", "empty_text", "invalid_utf8", "truncated"):
        counts[k] += cb.counts[k]
    rec = np.empty(batch.num_rows, row_t)
    rec["id"], rec["key"], rec["valid"] = id64(key_cols), batch_keys(key_cols, cb), cb.valid
    rec["pos"] = np.arange(start, start + batch.num_rows)
    rec["k"] = np.stack(key_cols, axis=1).astype(np.int64)
    spill.add(rec["id"], rec)
    bad = np.flatnonzero(~cb.valid)
    if bad.size:
        reject_keys.append(rec["k"][bad])
        reject_reasons.extend(cb.reasons[i] for i in bad)  # type: ignore[misc]
    return batch.num_rows


def plan(input_path: Path, out: Path, spec: TextTable, enc_id: str, max_chars: int, folder: Path,
         bucket_rows: int = 65_536) -> Plan:
    """Plan the stage into ``folder`` (a scratch folder the caller removes): see the module docstring."""
    counts = {"null_text": 0, "empty_text": 0, "invalid_utf8": 0, "truncated": 0, "duplicate_key": 0,
              "discarded_unfinished_writes": 0, "discarded_corrupt_parts": 0, "discarded_other_encoder_rows": 0}
    ds = _input_dataset(input_path, spec)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in ds.files)
    bits = _bucket_bits(total, bucket_rows)
    nk = len(spec.key_columns)
    row_t = np.dtype([("id", np.uint64), ("key", np.uint64), ("pos", np.int64), ("valid", np.bool_),
                      ("k", np.int64, (nk,))])
    spill = Spill(folder, "input", row_t, bits)
    reject_keys: list[np.ndarray] = []
    reject_reasons: list[str] = []
    rows = 0
    try:
        for batch in _stream_batches(ds, [*spec.key_columns, spec.text_column]):
            # one function call per batch: its Python strings are all freed before the next batch is read
            # (two batches alive at once fragmented the heap: the driver crept ~1 MB per batch)
            rows += _plan_batch(batch, rows, spec, max_chars, input_path, row_t, spill, counts, reject_keys,
                                reject_reasons)
    finally:
        spill.close()
    parts = spill_parts(_existing_parts(out, enc_id, counts), spec, folder, bits)
    n_current = 0
    sizes: dict[str, list[int]] = {"todo": [], "skip": []}
    dup_pos, dup_keys = [], []
    for b in range(1 << bits):
        rec = spill.load(b)
        order = np.lexsort((rec["pos"], rec["id"]))  # by key columns, then input order: the first row wins
        first = np.ones(rec.size, dtype=bool)
        first[order[1:]] = rec["id"][order[1:]] != rec["id"][order[:-1]]
        dup = ~first
        dup_pos.append(rec["pos"][dup])
        dup_keys.append(rec["k"][dup])
        current = np.unique(rec["key"][rec["valid"] & first])
        np.save(folder / f"current-{b:03d}.npy", current)
        have = np.unique(parts.load(b)["key"])
        todo = np.setdiff1d(current, have, assume_unique=True)
        # rows a task must not embed although valid: done already, or a repeated key with another text
        repeated = np.setdiff1d(rec["key"][dup & rec["valid"]], current)
        skip = np.union1d(np.intersect1d(current, have, assume_unique=True), repeated)
        for name, keys in (("todo", todo), ("skip", skip)):
            np.save(folder / f"{name}-{b:03d}.npy", keys)
            sizes[name].append(keys.size)
        n_current += current.size
        del rec, order, first, dup, current, have, todo, skip
    n_todo = sum(sizes["todo"])
    mode = "keep" if n_todo <= sum(sizes["skip"]) else "skip"
    _join_segments(folder, FILTER_LIST[mode], sizes[FILTER_LIST[mode]])
    dpos = np.concatenate(dup_pos)
    counts["duplicate_key"] = int(dpos.size)
    if dpos.size:
        reject_keys.append(np.concatenate(dup_keys)[np.argsort(dpos, kind="stable")])
        reject_reasons.extend(["duplicate_key"] * dpos.size)
    rk = np.concatenate(reject_keys) if reject_keys else np.zeros((0, nk), np.int64)
    rejects = pa.table({**{c: pa.array(rk[:, i], pa.int64()) for i, c in enumerate(spec.key_columns)},
                        "reason": pa.array(reject_reasons, pa.string())})
    return Plan(rows, n_current, n_todo, n_current - n_todo, counts, rejects, bits, folder, mode)


# ---------------------------------------------------------------------------------------- Ray parts


def select_rows(batch: pa.Table, flt: KeyFilter, key_columns: tuple[str, ...], text_column: str,
                max_chars: int) -> pa.Table:
    """Rows of ``batch`` the plan wants embedded, as (keys..., text, text_sha1). Runs in Ray tasks."""
    cb = clean_texts(batch.column(text_column), max_chars)
    keys = [batch.column(c).to_numpy(zero_copy_only=False) for c in key_columns]
    idx = np.flatnonzero(flt.wanted(id64(keys), batch_keys(keys, cb), cb.valid))
    return pa.table({
        **{c: pa.array(k[idx], pa.int64()) for c, k in zip(key_columns, keys, strict=True)},
        "text": pa.array([cb.texts[i] for i in idx], pa.string()),
        "text_sha1": pa.array([cb.sha1[i] for i in idx], pa.string()),
    })


def select_rows_task(batch: pa.Table, filter_ref: Any, **kwargs: Any) -> pa.Table:
    import ray

    # map_batches does not resolve ObjectRefs in fn_kwargs; the get is a zero-copy read from the object store.
    return select_rows(batch, ray.get(filter_ref), **kwargs)


__all__ = ["CATALOG_TEXTS", "DIM_META", "ENCODER_META", "FILTER_LIST", "KeyFilter", "PART_ROW", "Plan", "Spill",
           "TextTable", "plan", "select_rows", "select_rows_task", "spill_parts"]
