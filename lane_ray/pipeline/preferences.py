"""Ray Data stage: every user's train prefix -> LLM preferences (``preferences.parquet``), cached.

Rows are keyed by (user_id, history SHA-1, prompt version, model id): a re-run or a resumed run only asks
the LLM for users whose key is missing. LLM actors (one backend loaded per actor) process batches of users;
each batch is written as one atomic part file, so a killed job keeps every finished batch.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lane_ray.data.split import LeaveOneOutSplit
from lane_ray.io import read_parquet, write_json
from lane_ray.llm.preferences import (
    ExtractionSettings,
    UserHistory,
    attribute_columns,
    extract_batch,
)
from lane_ray.llm.prompts import HistoryItem
from lane_ray.pipeline.keyed_parts import KeyedParts
from lane_ray.progress import llm_rate_key, log
from lane_ray.text.rows import key64, text_sha1

PREFERENCES_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("preferences", pa.list_(pa.string())), ("status", pa.string()),
    ("history_sha1", pa.string()), ("model", pa.string()), ("prompt_version", pa.string()), ("raw", pa.string()),
    ("new_tokens", pa.int64()), ("rejected", pa.string()),
])


def user_histories(interactions: pa.Table, catalog: pa.Table, max_users: int | None = None) -> list[UserHistory]:
    """Train prefixes (never validation or test items) as prompt-ready histories, users in id order."""
    split = LeaveOneOutSplit.from_interactions(interactions)
    cols = catalog.column_names
    extra_cols = [catalog[c].to_pylist() for c in attribute_columns(catalog)]
    extras = list(zip(*extra_cols, strict=True)) if extra_cols else [()] * catalog.num_rows
    meta = {
        int(i): (t, g, y, tuple(x))
        for i, t, g, y, x in zip(
            catalog["item_id"].to_pylist(), catalog["title"].to_pylist(),
            catalog["genres"].to_pylist() if "genres" in cols else [None] * catalog.num_rows,
            catalog["year"].to_pylist() if "year" in cols else [None] * catalog.num_rows, extras, strict=True,
        )
    }
    n = split.num_users if max_users is None else min(max_users, split.num_users)
    out = []
    for i in range(n):
        prefix = split.train_prefix(i)
        split.check_history(i, prefix)  # the guard: only train items reach a prompt
        out.append(UserHistory(int(split.user_ids[i]), [HistoryItem(*meta[int(x)]) for x in prefix]))
    return out


def _keys(user_ids: np.ndarray, history_sha1: list[str], model: str | list[str],
          prompt_version: str | list[str]) -> np.ndarray:
    """Cache keys of (user, history, model, prompt version); model and version: one for all rows, or per row."""
    n = len(history_sha1)
    models = [model] * n if isinstance(model, str) else model
    versions = [prompt_version] * n if isinstance(prompt_version, str) else prompt_version
    return key64([np.asarray(user_ids, dtype=np.int64)],
                 [text_sha1(f"{h}|{m}|{v}") for h, m, v in zip(history_sha1, models, versions, strict=True)])


def _row_keys(table: pa.Table) -> np.ndarray:
    """Cache keys of stored rows, from their own history hash, model and prompt version."""
    return _keys(table["user_id"].to_numpy(), table["history_sha1"].to_pylist(), table["model"].to_pylist(),
                 table["prompt_version"].to_pylist())


class ExtractBatch:
    """Callable class for ``map_batches``: one LLM backend per actor, one generation round per batch."""

    def __init__(self, backend_kind: str, backend_kwargs: dict[str, Any], settings: dict[str, Any],
                 niceness: int | None = None) -> None:
        from lane_ray.llm import make_backend
        from lane_ray.pipeline.cluster import set_niceness

        set_niceness(niceness)

        self.backend = make_backend(backend_kind, **backend_kwargs)
        self.settings = ExtractionSettings(**settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        users = [UserHistory(int(u), [HistoryItem(t, g, y, tuple(x)) for t, g, y, x in json.loads(h)])
                 for u, h in zip(batch["user_id"].to_pylist(), batch["history"].to_pylist(), strict=True)]
        counter = getattr(self.backend, "count_tokens", None)
        results = extract_batch(users, self.backend, self.settings, counter)
        return pa.Table.from_pylist([{
            "user_id": r.user_id, "preferences": r.preferences, "status": r.status,
            "history_sha1": r.history_sha1, "model": self.backend.model_id,
            "prompt_version": self.settings.prompt_version, "raw": r.raw, "new_tokens": r.new_tokens,
            "rejected": json.dumps(r.rejected, sort_keys=True),
        } for r in results], schema=PREFERENCES_SCHEMA)


def run_preferences(users: list[UserHistory], out: Path, backend_kind: str, backend_kwargs: dict[str, Any],
                    settings: ExtractionSettings, model_id: str, batch_size: int, actors: int,
                    cpus_per_actor: float, gpus_per_actor: float, use_ray: bool = True,
                    niceness: int | None = None) -> dict[str, Any]:
    """Extract preferences for ``users`` into the part directory ``out`` (only the keys not stored yet, by
    :class:`~lane_ray.pipeline.keyed_parts.KeyedParts`); returns the manifest."""
    t0 = time.perf_counter()
    parts = KeyedParts([out], _row_keys, ["user_id", "history_sha1", "model", "prompt_version"], PREFERENCES_SCHEMA)
    sha = [u.sha1(settings.with_attributes) for u in users]
    ids = np.array([u.user_id for u in users], dtype=np.int64)
    version = settings.prompt_version
    current = _keys(ids, sha, model_id, version)
    todo_users = [users[i] for i in parts.missing(current)]
    log(f"preferences: {len(users):,} users, {len(users) - len(todo_users):,} cached, {len(todo_users):,} to extract")
    if todo_users:
        table = pa.table({
            "user_id": pa.array([u.user_id for u in todo_users], pa.int64()),
            "history": pa.array([json.dumps([[it.title, it.genres, it.year, list(it.extra)] for it in u.items])
                                 for u in todo_users], pa.string()),
        })
        ctor = {"backend_kind": backend_kind, "backend_kwargs": backend_kwargs, "settings": dict(settings.__dict__),
                "niceness": niceness if use_ray else None}  # in-process: never renice the driver
        parts.generate(table, ExtractBatch, ctor, batch_size, actors, cpus_per_actor, gpus_per_actor, use_ray,
                       "users", llm_rate_key("preferences", backend_kind, model_id, gpus_per_actor))
    # one row per current key: rows of an older model or prompt version fall outside the current keys
    final, compact = parts.live(current)
    if not compact:
        parts.replace([(out, final)])
    status = Counter(final["status"].to_pylist())
    seconds = parts.generate_seconds
    manifest = {
        "users": final.num_rows, "extracted_now": len(todo_users), "cached": len(users) - len(todo_users),
        "status": {k: int(v) for k, v in status.items()}, "model": model_id,
        "prompt_version": version, "m": settings.m, "seconds": round(time.perf_counter() - t0, 3),
        "extract_seconds": round(seconds, 3), "discarded_unfinished_writes": parts.unfinished,
        "driver_peak_rss_mb": parts.peak_rss_mb,
    }
    if todo_users and seconds:
        now = final.filter(pa.array(np.isin(final["user_id"].to_numpy(), [u.user_id for u in todo_users])))
        toks = int(np.sum(now["new_tokens"].to_numpy()))
        manifest["new_tokens"] = toks
        manifest["tokens_per_s"] = round(toks / seconds, 1)
        manifest["users_per_s"] = round(len(todo_users) / seconds, 3)
    if final.num_rows != len(users):
        raise RuntimeError(f"{out}: expected {len(users)} users after the run, found {final.num_rows}")
    write_json(out / "_manifest.json", manifest)
    return manifest


def read_preferences(path: str | Path) -> pa.Table:
    return read_parquet(path)


def write_preference_texts(preferences: str | Path, out: str | Path) -> int:
    """One row per (user_id, slot, text) of ``preferences.parquet``, written atomically to ``out``: the input
    of the embedding stage that makes ``preference_embeddings.parquet``. Returns the row count."""
    from lane_ray.io import write_parquet

    t = read_parquet(preferences, columns=["user_id", "preferences"])
    users = t["user_id"].to_numpy()
    lists = t["preferences"].to_pylist()
    lens = np.array([len(x) for x in lists], dtype=np.int64)
    table = pa.table({
        "user_id": pa.array(np.repeat(users, lens), pa.int64()),
        "slot": pa.array(np.concatenate([np.arange(n) for n in lens]) if lens.size else [], pa.int64()),
        "text": pa.array([p for x in lists for p in x], pa.string()),
    })
    write_parquet(Path(out), table)
    return table.num_rows


__all__ = ["PREFERENCES_SCHEMA", "ExtractBatch", "read_preferences", "run_preferences", "user_histories",
           "write_preference_texts"]
