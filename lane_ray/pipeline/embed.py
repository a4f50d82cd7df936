"""Ray Data stage: a Parquet table of texts -> embeddings Parquet, incremental and resumable.

    catalog.parquet (item_id, title) ──read──► keep rows not embedded yet ──► encoder actors ──► part files

Output: a directory (``item_embeddings.parquet/``) of ``part-<uuid>.parquet`` files with the key columns,
``text_sha1`` and ``embedding: fixed_size_list<float32>[dim]`` (the encoder id in the file metadata), plus
``_manifest.json`` (counts and settings) and ``_rejects.parquet`` (rows not embedded, with the reason).

How it stays incremental, resumable and duplicate-free:

1. *Plan* (:mod:`lane_ray.pipeline.embed_plan`; driver, streaming, bucketed): every input row gets a key from its
   key columns and its text's SHA-1; keys already present in the output with the same encoder are not embedded
   again. Changed titles have new keys, so only they (and new rows) are embedded. Rows are spilled to disk in
   buckets by key columns and planned one bucket at a time, so the driver's memory does not grow with the
   catalogue.
2. *Embed* (Ray Data, this module): ``read_parquet`` → filter to the planned keys → [tokenizer actors on CPUs] →
   ``map_batches`` with a callable encoder class on an actor pool (``ActorPoolStrategy(min_size, max_size)``,
   ``num_gpus`` per actor when the cluster has GPUs), which writes each embedded block itself to a temporary name
   and renames it: a part file exists whole or not at all, so a killed job leaves only finished parts, and a
   re-run skips them.
3. *Compact* (:mod:`lane_ray.pipeline.embed_compact`): rows whose key is no longer in the input (old titles,
   removed items) and repeated keys (a retried task) are removed from the parts they are in, each part rewritten
   atomically.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lane_ray.config import EmbedConfig, RayConfig
from lane_ray.errors import ConfigError, DataError
from lane_ray.io import parquet_files, write_json, write_parquet
from lane_ray.pipeline.embed_compact import compact
from lane_ray.pipeline.embed_plan import (
    CATALOG_TEXTS,
    DIM_META,
    ENCODER_META,
    Plan,
    TextTable,
    plan,
    select_rows_task,
)
from lane_ray.pipeline.sink import PART_PREFIX, PartWriter, finish_parts
from lane_ray.progress import NewEntries, RssSampler, expect, log

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
        if cfg.max_actors is None and cpus > 1 and max_actors * pool["num_cpus"] > cpus - 1 - tok_cpus + 1e-9:
            # nodes too small to keep a CPU free each (1-CPU nodes: an actor takes a whole node): fewer actors,
            # so one CPU of the cluster is left for the read/select tasks, which would otherwise wait forever
            pool["max"] = max(1, int((cpus - 1 - tok_cpus) // pool["num_cpus"]))
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

    from lane_ray.pipeline.cluster import init_ray, wait_for_resources

    init_ray(ray_cfg)
    # one encoder actor's worth of the cluster before the pool is sized from it: on an autoscaling cluster whose
    # head runs no tasks, the autoscaler adds the first node (Ray Data's pool grows to embed.max_actors as more come)
    first = {"GPU": cfg.gpus_per_actor} if cfg.device.startswith("cuda") else {"CPU": 1.0}
    resources = wait_for_resources([first], "embed (an encoder actor)", ray_cfg)
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
    ds = ds.map_batches(select_rows_task, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
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


__all__ = ["EncodeBatch", "TokenizeBatch", "actor_pool", "block_plan", "embed_texts",
           "read_embeddings"]
