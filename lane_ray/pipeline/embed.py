"""Ray Data stage: a Parquet table of texts -> embeddings Parquet, incremental and resumable.

    catalog.parquet (item_id, title) ──read──► keep rows not embedded yet ──► encoder actors ──► part files

Output: a directory (``item_embeddings.parquet/``) of ``part-<uuid>.parquet`` files with the key columns,
``text_sha1`` and ``embedding: fixed_size_list<float32>[dim]`` (the encoder id in the file metadata), plus
``_manifest.json`` (counts and settings) and ``_rejects.parquet`` (rows not embedded, with the reason).

How it stays incremental, resumable and duplicate-free:

1. *Plan* (driver, streaming, bucketed): every input row gets a key from its key columns and its text's SHA-1;
   keys already present in the output with the same encoder are not embedded again. Changed titles have new
   keys, so only they (and new rows) are embedded. Rows are spilled to disk in buckets by key columns and
   planned one bucket at a time, so the driver's memory does not grow with the catalogue.
2. *Embed* (Ray Data): ``read_parquet`` → filter to the planned keys → [tokenizer actors on CPUs] →
   ``map_batches`` with a callable encoder class on an actor pool (``ActorPoolStrategy(min_size, max_size)``,
   ``num_gpus`` per actor when the cluster has GPUs), which writes each embedded block itself to a temporary name and
   renames it: a part file exists whole or not at all, so a killed job leaves only finished parts, and a
   re-run skips them.
3. *Compact*: rows whose key is no longer in the input (old titles, removed items) and repeated keys (a
   retried task) are removed from the parts they are in, each part rewritten atomically.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lane_ray.config import EmbedConfig, RayConfig
from lane_ray.errors import ConfigError, DataError
from lane_ray.io import parquet_files, write_json, write_parquet
from lane_ray.pipeline.sink import PART_PREFIX, PartWriter, finish_parts
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


class _Spill:
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


def _spill_parts(parts: list[Path], spec: TextTable, folder: Path, bits: int) -> _Spill:
    """Keys of every row of ``parts``, bucketed, with where the row is (part index, row index)."""
    spill = _Spill(folder, "parts", PART_ROW, bits)
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
                row_t: np.dtype, spill: _Spill, counts: dict[str, int], reject_keys: list[np.ndarray],
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
    spill = _Spill(folder, "input", row_t, bits)
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
    parts = _spill_parts(_existing_parts(out, enc_id, counts), spec, folder, bits)
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


def _select_rows_task(batch: pa.Table, filter_ref: Any, **kwargs: Any) -> pa.Table:
    import ray

    # map_batches does not resolve ObjectRefs in fn_kwargs; the get is a zero-copy read from the object store.
    return select_rows(batch, ray.get(filter_ref), **kwargs)


TOKEN_PREFIX = "tok:"  # columns of token arrays between the tokenizer and the encoder actors


def _token_columns(feats: dict[str, list[np.ndarray]]) -> dict[str, pa.Array]:
    out = {}
    for name, arrays in feats.items():
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([a.size for a in arrays])
        values = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        out[TOKEN_PREFIX + name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
    return out


def _token_features(batch: pa.Table) -> dict[str, list[np.ndarray]]:
    feats = {}
    for name in batch.column_names:
        if name.startswith(TOKEN_PREFIX):
            col = batch.column(name).combine_chunks()
            values = col.values.to_numpy(zero_copy_only=False)
            offsets = col.offsets.to_numpy()
            feats[name[len(TOKEN_PREFIX):]] = np.split(values, offsets[1:-1] - offsets[0]) if len(col) else []
    return feats


class TokenizeBatch:
    """Callable class for ``map_batches`` on CPU actors: texts -> token arrays (``tok:*`` list columns)."""

    def __init__(self, model: str, niceness: int | None = None) -> None:
        from lane_ray.pipeline.cluster import set_niceness
        from lane_ray.text import TextEncoder

        # the model's preprocessing (tokenizer and truncation settings) only: its weights are never read
        self.encoder = TextEncoder(model, device="cpu", num_threads=1, weights=False)
        set_niceness(niceness)  # once loaded, as the encoder actors do

    def __call__(self, batch: pa.Table) -> pa.Table:
        feats = self.encoder.tokenize(batch.column("text").to_pylist())
        keep = [c for c in batch.column_names if c != "text"]
        return pa.table({**{c: batch.column(c) for c in keep}, **_token_columns(feats)})


class EncodeBatch:
    """Callable class for ``map_batches``: loads the encoder once per actor, embeds each batch (of texts, or of
    token arrays from :class:`TokenizeBatch`). With a ``writer`` it writes each result as a part file itself and
    returns only its row count: the embeddings (the stage's largest data, 1.5 kB per row) then never pass
    through the object store (measured: the encoder actor and a write worker each mapped ~1 MB of object-store
    pages per 1,000 titles, so their RSS grew with the catalogue until the whole store was mapped)."""

    def __init__(self, model: str, device: str, batch_size: int, fp16: bool | None, num_threads: int | None,
                 key_columns: tuple[str, ...], niceness: int | None = None, writer: PartWriter | None = None) -> None:
        from lane_ray.pipeline.cluster import set_niceness
        from lane_ray.text import TextEncoder

        self.encoder = TextEncoder(model, device=device, batch_size=batch_size, fp16=fp16, num_threads=num_threads)
        self.key_columns = key_columns
        self.writer = writer
        # Raised priority only once loaded: while the actors import torch and sentence-transformers (~5 s of CPU
        # each) the read/select tasks (at Ray's nice 15) got almost no CPU, and the first batches arrived 1-2 s
        # after the actors were ready (measured on 2 cores). With this order a single run showed no measurable
        # change in that start-up time; kept since nothing needs the higher priority before the first batch.
        set_niceness(niceness)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "text" in batch.column_names:
            vecs = self.encoder.encode(batch.column("text").to_pylist())
        else:
            vecs = self.encoder.encode_tokens(_token_features(batch))
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
        table = pa.table({**{c: batch.column(c) for c in self.key_columns}, "text_sha1": batch.column("text_sha1"),
                          "embedding": emb})
        return self.writer(table) if self.writer is not None else table


def actor_pool(cfg: EmbedConfig, resources: dict[str, float], node_cpus: list[float] | None = None,
          todo: int | None = None) -> dict[str, Any]:
    """The encoder (and tokenizer) actor layout for a cluster with ``resources`` (totals) whose nodes have
    ``node_cpus`` CPUs each (unset = one node holding them all), for ``todo`` texts (unset = unbounded): never
    more encoder actors than blocks of ``rows_per_batch`` texts, and the whole pool started at once unless
    ``min_actors`` says otherwise (an actor added later by Ray Data's autoscaler started ~6 s after the first on
    2 cores, importing sentence-transformers while the first one already worked).

    CPU default: one single-threaded encoder actor per core. Measured on 2 cores (synthetic titles): two
    1-thread actors embedded 6-10 % more titles per second than one 2-thread actor, which burnt ~10 % more CPU per
    title: Ray's own processes wake ~1,700 times a second, and every time one preempts a torch thread its peer
    waits for it at the next parallel op. A 1-thread actor only loses the slice it was preempted for. The
    actors' logical CPUs are set so that one CPU per node stays free for the read/select tasks (Ray Data gives
    each task one CPU): 0.5 per actor on 2 cores, 0.9375 on 16."""
    gpus = resources.get("GPU", 0)
    use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus >= cfg.gpus_per_actor)
    cpus = resources.get("CPU", 1)
    tokenize = use_gpu if cfg.tokenize_stage is None else cfg.tokenize_stage
    node = min(node_cpus) if node_cpus else cpus  # the smallest node decides, so every node keeps a free CPU
    tok_cpus = 0.0
    if use_gpu:
        max_actors = cfg.max_actors or max(1, int(gpus // cfg.gpus_per_actor))
        per = cfg.cpus_per_actor or 1.0
        pool = {"use_gpu": True, "max": max_actors, "threads": None,
                "num_gpus": cfg.gpus_per_actor, "num_cpus": per, "device": "cuda"}
    else:
        threads = cfg.threads_per_actor or 1
        # tokenizer actors (only when asked for on CPU) take whole CPUs of their own, by default one
        tok_cpus = (cfg.tokenizer_actors or 1) * cfg.tokenizer_cpus_per_actor if tokenize else 0.0
        max_actors = cfg.max_actors or max(1, int((cpus - tok_cpus) // threads))
        per = cfg.cpus_per_actor
        if per is None:
            on_node = max(1, min(max_actors, int((node - tok_cpus) // threads)))
            free = node - 1 - tok_cpus
            per = min(float(threads), free / on_node) if free > 0 else 1.0
        pool = {"use_gpu": False, "max": max_actors, "threads": threads,
                "num_gpus": 0, "num_cpus": math.floor(per * 1e4) / 1e4, "device": "cpu"}  # never above the free share
    if todo is not None and math.ceil(todo / cfg.rows_per_batch) < pool["max"]:
        pool["max"] = max(1, math.ceil(todo / cfg.rows_per_batch))
        if not use_gpu and cfg.threads_per_actor is None:  # fewer actors than cores: give them the cores
            pool["threads"] = max(1, int((node - tok_cpus) // pool["max"]))
    pool["min"] = min(cfg.min_actors or pool["max"], pool["max"])
    pool["tokenizers"] = 0
    if tokenize:
        free = cpus - 1 - pool["max"] * pool["num_cpus"]
        pool["tokenizers"] = cfg.tokenizer_actors or max(1, int(free // cfg.tokenizer_cpus_per_actor))
    held = pool["max"] * pool["num_cpus"] + pool["tokenizers"] * cfg.tokenizer_cpus_per_actor
    if tokenize and held > cpus - 1 + 1e-9:
        raise ConfigError(
            f"embed: {pool['max']} encoder actor(s) x {pool['num_cpus']:g} CPU + {pool['tokenizers']} tokenizer "
            f"actor(s) x {cfg.tokenizer_cpus_per_actor:g} CPU leave less than one of the cluster's {cpus:g} CPUs for "
            "reading and writing; lower embed.max_actors, embed.cpus_per_actor or embed.tokenizer_cpus_per_actor, "
            "or set embed.tokenize_stage=false")
    return pool


def block_plan(rows: int, todo: int, actors: int, cfg: EmbedConfig) -> tuple[int, int]:
    """(texts per encoder batch, input blocks to read) for ``todo`` texts out of ``rows`` input rows.

    Balanced: the batch count is a multiple of the actor count and batches are equal (at most
    ``rows_per_batch``), so the actors finish together instead of one embedding a last full batch while the
    others idle (with 4,096-row batches a 1-thread actor spends ~9 s on one). Each read block holds a whole
    number of batches (~``rows_per_block`` input rows), so repartitioning leaves no fragments."""
    actors = max(1, actors)
    batches = actors * max(1, math.ceil(todo / (cfg.rows_per_batch * actors)))
    batch_rows = max(1, math.ceil(todo / batches))
    todo_per_read = cfg.rows_per_block * todo / max(rows, 1)  # texts to embed in a block of rows_per_block rows
    per_read = max(1, int(todo_per_read // batch_rows))
    blocks = max(min(batches, 2 * actors), math.ceil(batches / per_read))
    while batches % blocks:  # a divisor of the batch count: every read block splits into whole batches
        blocks += 1
    return batch_rows, blocks


def _node_cpus() -> list[float]:
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]


def _run_ray(input_path: Path, out: Path, spec: TextTable, p: Plan, cfg: EmbedConfig, ray_cfg: RayConfig,
             enc_id: str, dim: int) -> dict[str, Any]:
    import ray

    from lane_ray.pipeline.cluster import init_ray

    resources = init_ray(ray_cfg)
    pool = actor_pool(cfg, resources, _node_cpus(), p.n_todo)
    batch_rows, n_blocks = block_plan(p.rows, p.n_todo, pool["max"], cfg)
    log(f"embed: {p.n_todo:,} texts on {pool['min']}..{pool['max']} {'GPU' if pool['use_gpu'] else 'CPU'} "
        f"actor(s)" + (f" x {pool['threads']} threads" if pool["threads"] else "")
        + f" ({pool['num_cpus']:g} CPU each)"
        + (f" fed by 1..{pool['tokenizers']} tokenizer actor(s)" if pool["tokenizers"] else "")
        + f", {n_blocks} read blocks, batches of {batch_rows:,} texts")
    t0 = time.perf_counter()
    ds = ray.data.read_parquet([str(p) for p in parquet_files(input_path)], override_num_blocks=n_blocks)
    ds = ds.select_columns([*spec.key_columns, spec.text_column])  # pushed down into the Parquet read
    ds = ds.map_batches(_select_rows_task, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                        fn_kwargs={"filter_ref": ray.put(p.key_filter()), "key_columns": spec.key_columns,
                                   "text_column": spec.text_column, "max_chars": cfg.max_chars})
    # Blocks of one encoder batch each, so every actor of the pool gets work (a Parquet file often reads as
    # one block); this repartition streams, it does not materialise the dataset.
    ds = ds.repartition(target_num_rows_per_block=batch_rows)
    if pool["tokenizers"]:
        ds = ds.map_batches(
            TokenizeBatch, batch_format="pyarrow", batch_size=batch_rows,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool["tokenizers"]),
            num_cpus=cfg.tokenizer_cpus_per_actor,
            fn_constructor_kwargs={"model": cfg.model, "niceness": cfg.actor_niceness},
        )
    ds = ds.map_batches(
        EncodeBatch, batch_format="pyarrow", batch_size=batch_rows,
        compute=ray.data.ActorPoolStrategy(min_size=pool["min"], max_size=pool["max"]),
        num_cpus=pool["num_cpus"], num_gpus=pool["num_gpus"],
        fn_constructor_kwargs={"model": cfg.model, "device": pool["device"], "batch_size": cfg.batch_size,
                               "fp16": cfg.fp16, "num_threads": pool["threads"], "key_columns": spec.key_columns,
                               "niceness": cfg.actor_niceness,
                               "writer": PartWriter(out, {ENCODER_META: enc_id.encode(), DIM_META: str(dim).encode()})},
    )
    # the encoder actors write the parts; what comes back is one row count per block
    counts = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    written = sum(int(pc.sum(b["rows"]).as_py() or 0) for b in counts)
    finish_parts(out)
    return {"seconds": round(time.perf_counter() - t0, 3), "actors_max": pool["max"], "threads": pool["threads"],
            "cpus_per_actor": pool["num_cpus"],
            "use_gpu": pool["use_gpu"], "blocks": n_blocks, "batch_rows": batch_rows,
            "tokenizer_actors_max": pool["tokenizers"],
            "rows_written": written}


# ------------------------------------------------------------------------------------------ compact


def compact(out: Path, spec: TextTable, p: Plan) -> dict[str, int]:
    """Remove rows whose key is not current and repeated keys; rewrite touched parts atomically. Works bucket by
    bucket like the plan; returns the counts and the rows the output holds afterwards."""
    parts = sorted(out.glob(f"{PART_PREFIX}*.parquet"))
    stats = {"removed_stale": 0, "removed_duplicates": 0, "rows": 0}
    if not parts:
        return stats
    spill = _spill_parts(parts, spec, p.folder, p.bits)
    drops: list[np.ndarray] = []  # (part, row) of every row to remove
    for b in range(1 << p.bits):
        rec, current = spill.load(b), p.current(b)
        pos = np.minimum(np.searchsorted(current, rec["key"]), max(current.size - 1, 0))
        live = (current[pos] == rec["key"]) if current.size else np.zeros(rec.size, bool)
        first = np.zeros(rec.size, dtype=bool)
        first[np.unique(rec["key"], return_index=True)[1]] = True
        stats["removed_stale"] += int((~live).sum())
        stats["removed_duplicates"] += int((live & ~first).sum())
        stats["rows"] += int((live & first).sum())
        drop = rec[~(live & first)]
        drops.append(np.stack([drop["part"].astype(np.int64), drop["row"].astype(np.int64)], axis=1))
    drop_all = np.concatenate(drops)
    if not drop_all.size:
        return stats
    drop_all = drop_all[np.argsort(drop_all[:, 0], kind="stable")]
    touched, starts = np.unique(drop_all[:, 0], return_index=True)
    for i, rows in zip(touched, np.split(drop_all[:, 1], starts[1:]), strict=True):
        part = parts[i]
        n = pq.read_metadata(part).num_rows
        if rows.size >= n:
            part.unlink()
            continue
        keep = np.ones(n, dtype=bool)
        keep[rows] = False
        write_parquet(part, pq.read_table(part).filter(pa.array(keep)))
    return stats


# --------------------------------------------------------------------------------------------- API


def embed_texts(input_path: str | Path, out_path: str | Path, cfg: EmbedConfig, ray_cfg: RayConfig,
                spec: TextTable = CATALOG_TEXTS) -> dict[str, Any]:
    """Embed the texts of ``input_path`` into ``out_path`` (see the module docstring); returns the manifest."""
    from lane_ray.pipeline.cluster import freed_memory_returned

    with freed_memory_returned():  # the driver streams the whole input: keep its memory flat
        return _embed_texts(Path(input_path), Path(out_path), cfg, ray_cfg, spec)


def _embed_texts(input_path: Path, out: Path, cfg: EmbedConfig, ray_cfg: RayConfig,
                 spec: TextTable) -> dict[str, Any]:
    from lane_ray.text import encoder_id

    if out.exists() and not out.is_dir():
        raise DataError("output exists and is a file; give a directory name such as item_embeddings.parquet",
                        file=out)
    t0 = time.perf_counter()
    enc_id = encoder_id(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    # the plan's spill files (about 40 bytes per input row) go to the system's temporary folder ($TMPDIR)
    with RssSampler() as rss, tempfile.TemporaryDirectory(prefix="lane-embed-plan-") as scratch:
        p = plan(input_path, out, spec, enc_id, cfg.max_chars, Path(scratch), cfg.plan_bucket_rows)
        log(f"embed: {p.rows:,} rows, {p.n_current:,} distinct texts: {p.reused:,} already embedded, "
            f"{p.n_todo:,} to embed, {len(p.rejects):,} rejected")
        run: dict[str, Any] = {"seconds": 0.0}
        dim = _model_dim(cfg.model)
        if p.n_todo:
            expect(p.n_todo, NewEntries(out), "texts", rate_key="texts/embed")
            run = _run_ray(input_path, out, spec, p, cfg, ray_cfg, enc_id, dim)
        comp = compact(out, spec, p)
    rows_out = sum(pq.read_metadata(f).num_rows for f in out.glob(f"{PART_PREFIX}*.parquet"))
    compacted_rows = comp.pop("rows")
    if rows_out != p.n_current or compacted_rows != rows_out:
        raise DataError(f"expected {p.n_current} embeddings after the run, found {rows_out}; re-run to "
                        "complete", file=out)
    rejects_path = out / "_rejects.parquet"
    if len(p.rejects):
        write_parquet(rejects_path, p.rejects)
    elif rejects_path.exists():
        rejects_path.unlink()
    manifest = {
        "encoder": enc_id, "model": cfg.model, "dim": dim, "input": str(input_path),
        "key_columns": list(spec.key_columns), "text_column": spec.text_column,
        "input_rows": p.rows, "rows": rows_out, "embedded_now": p.n_todo, "reused": p.reused,
        "rejected": int(len(p.rejects)), "counts": {**p.counts, **comp},
        "seconds": round(time.perf_counter() - t0, 3), "embed_seconds": run["seconds"],
        "driver_peak_rss_mb": rss.peak_mb, "plan_buckets": 1 << p.bits,
        "ray": {k: v for k, v in run.items() if k != "seconds"},
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


__all__ = ["CATALOG_TEXTS", "TextTable", "actor_pool", "block_plan", "compact", "embed_texts", "plan",
           "read_embeddings", "select_rows"]
