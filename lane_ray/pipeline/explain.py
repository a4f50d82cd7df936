"""Ray Data stage: recommended (user, item) candidates -> CoT explanations (``explanations.parquet``) and
their logic-check rates (``explanation_checks.json``), cached.

Candidates come from a file with ``user_id, item_id, rank, score, preference_weights`` (one row per
recommended item; the weights are the recommender's alignment weights over the user's ``m`` preferences).
Until the LANE model lands, that file is written by hand or by another tool; later the model writes it.

Rows are keyed by (user, item, rank, score, preferences, weights, history, target, settings, prompt version,
model): a re-run only explains what is missing. LLM actors (one backend per actor) explain batches of
candidates; each batch is one atomic part file. The checks that compare explanations with each other
(monotonicity within a user, copying across users) are recomputed over the whole current file at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lane_ray.errors import DataError, LaneError
from lane_ray.io import read_parquet, write_json
from lane_ray.llm.explain import (
    EXPLAIN_PROMPT_VERSION,
    ExplainRequest,
    ExplainSettings,
    check_rates,
    compute_checks,
    explain_batch,
)
from lane_ray.llm.prompts import HistoryItem
from lane_ray.pipeline.sink import map_to_parts, part_files, remove_unfinished, write_part
from lane_ray.progress import NewEntries, RssSampler, expect, log
from lane_ray.text.rows import key64

CANDIDATE_COLUMNS = ("user_id", "item_id", "rank", "score", "preference_weights")

CHECKS_TYPE = pa.struct([
    ("format_ok", pa.bool_()), ("names_target", pa.bool_()), ("top_weight_cited", pa.bool_()),
    ("likelihood_monotone", pa.bool_()), ("not_copied", pa.bool_()), ("unique_ratio", pa.float32()),
])

EXPLANATIONS_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_id", pa.int64()), ("rank", pa.int64()), ("steps", pa.list_(pa.string())),
    ("likelihood", pa.string()), ("reason", pa.string()), ("preference_weights", pa.list_(pa.float32())),
    ("checks", CHECKS_TYPE), ("source", pa.string()), ("fit", pa.list_(pa.float32())),
    ("why", pa.list_(pa.string())), ("weighted_fit", pa.float32()), ("score", pa.float64()),
    ("title", pa.string()), ("format_ok", pa.bool_()), ("key_sha1", pa.string()), ("model", pa.string()),
    ("prompt_version", pa.string()), ("raw", pa.string()), ("new_tokens", pa.int64()), ("attempts", pa.int64()),
])

_REQUEST_COLUMNS = ["user_id", "item_id", "rank", "score", "weights", "preferences", "history", "target",
                    "key_sha1"]


# -- candidates --------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    rows, lines = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON ({exc.msg})", file=path, row=n) from None
            if not isinstance(obj, dict):
                raise DataError("expected a JSON object", file=path, row=n)
            rows.append(obj)
            lines.append(n)
    return rows, lines


def _int(v: Any, path: Path, row: int, name: str, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise DataError(f"expected an integer, got {v!r}", file=path, row=row, field=name)
    if minimum is not None and v < minimum:
        raise DataError(f"must be >= {minimum}, got {v!r}", file=path, row=row, field=name)
    return int(v)


def read_candidates(path: str | Path) -> list[dict[str, Any]]:
    """Validated candidate rows of a Parquet file or directory, or a JSON-lines file (``.jsonl``, ``.json``,
    ``.ndjson``): integer ``user_id`` and ``item_id``, ``rank >= 1`` unique per user, a finite ``score``, and
    ``preference_weights`` a non-empty list of finite, non-negative numbers. Each row keeps ``_row``: its
    1-based row (Parquet) or line (JSON lines) for error messages. Bad input raises a one-line DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError("candidates file not found", file=path)
    if path.is_dir() or path.suffix == ".parquet":
        table = read_parquet(path)
        missing = [c for c in CANDIDATE_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"missing column (found: {', '.join(table.column_names)})", file=path, field=missing[0])
        cols = {c: table[c].to_pylist() for c in CANDIDATE_COLUMNS}
        raw = [{c: cols[c][i] for c in CANDIDATE_COLUMNS} for i in range(table.num_rows)]
        numbers = list(range(1, table.num_rows + 1))
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        raw, numbers = _read_jsonl(path)
        for r, n in zip(raw, numbers, strict=True):
            for c in CANDIDATE_COLUMNS:
                if c not in r:
                    raise DataError("missing field", file=path, row=n, field=c)
    else:
        raise DataError("unknown candidates format: use .parquet (file or directory) or .jsonl", file=path)
    if not raw:
        raise DataError("no candidate rows", file=path)
    out = []
    seen_item: dict[tuple[int, int], int] = {}
    seen_rank: dict[tuple[int, int], int] = {}
    for r, n in zip(raw, numbers, strict=True):
        u = _int(r["user_id"], path, n, "user_id")
        i = _int(r["item_id"], path, n, "item_id")
        k = _int(r["rank"], path, n, "rank", minimum=1)
        s = r["score"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"expected a finite number, got {s!r}", file=path, row=n, field="score")
        w = r["preference_weights"]
        if not isinstance(w, (list, tuple)) or not w:
            raise DataError(f"expected a non-empty list of numbers, got {w!r}", file=path, row=n,
                            field="preference_weights")
        for x in w:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise DataError(f"every weight must be a finite number >= 0, got {x!r}", file=path, row=n,
                                field="preference_weights")
        if (u, i) in seen_item:
            raise DataError(f"user {u} has item {i} twice (also row {seen_item[(u, i)]})", file=path, row=n,
                            field="item_id")
        if (u, k) in seen_rank:
            raise DataError(f"user {u} has rank {k} twice (also row {seen_rank[(u, k)]})", file=path, row=n,
                            field="rank")
        seen_item[(u, i)] = seen_rank[(u, k)] = n
        out.append({"user_id": u, "item_id": i, "rank": k, "score": float(s),
                    "preference_weights": [float(x) for x in w], "_row": n})
    return out


def select_candidates(cands: list[dict[str, Any]], top_k: int | None, max_users: int | None) -> list[dict[str, Any]]:
    """Rows with ``rank <= top_k`` of the first ``max_users`` users by id, ordered by user then rank."""
    users = sorted({c["user_id"] for c in cands})
    if max_users is not None:
        users = users[:max_users]
    keep = set(users)
    rows = [c for c in cands if c["user_id"] in keep and (top_k is None or c["rank"] <= top_k)]
    return sorted(rows, key=lambda c: (c["user_id"], c["rank"]))


# -- requests ----------------------------------------------------------------------------------------------

def _history_sha1(items: list[HistoryItem]) -> str:
    return hashlib.sha1(json.dumps([[it.title, it.genres, it.year] for it in items]).encode()).hexdigest()


def build_requests(cands: list[dict[str, Any]], preferences: pa.Table, interactions: pa.Table, catalog: pa.Table,
                   candidates_path: str | Path, preferences_path: str | Path) -> list[ExplainRequest]:
    """One :class:`ExplainRequest` per candidate row: the user's preferences (from ``preferences``), train
    prefix (leave-one-out, never validation or test items) and the target's catalogue entry. A row naming an
    unknown user or item, or whose weight count differs from the user's preference count, raises DataError."""
    from lane_ray.data.split import LeaveOneOutSplit

    for c in ("user_id", "preferences"):
        if c not in preferences.column_names:
            raise DataError("missing column", file=preferences_path, field=c)
    prefs = {int(u): list(p or []) for u, p in zip(preferences["user_id"].to_pylist(),
                                                   preferences["preferences"].to_pylist(), strict=True)}
    cols = catalog.column_names
    meta = {
        int(i): HistoryItem(t or "", g, str(y) if y is not None else None)
        for i, t, g, y in zip(
            catalog["item_id"].to_pylist(), catalog["title"].to_pylist(),
            catalog["genres"].to_pylist() if "genres" in cols else [None] * catalog.num_rows,
            catalog["year"].to_pylist() if "year" in cols else [None] * catalog.num_rows, strict=True,
        )
    }
    split = LeaveOneOutSplit.from_interactions(interactions)
    histories: dict[int, list[HistoryItem]] = {}
    out = []
    path = Path(candidates_path)
    for c in cands:
        u, n = c["user_id"], c["_row"]
        if u not in prefs:
            raise DataError(f"user {u} has no preferences in {preferences_path} (run `lane preferences` for them)",
                            file=path, row=n, field="user_id")
        if not prefs[u]:
            raise DataError(f"user {u} has an empty preference list in {preferences_path}", file=path, row=n,
                            field="user_id")
        if len(c["preference_weights"]) != len(prefs[u]):
            raise DataError(f"{len(c['preference_weights'])} weights but user {u} has {len(prefs[u])} preferences",
                            file=path, row=n, field="preference_weights")
        if c["item_id"] not in meta:
            raise DataError(f"item {c['item_id']} is not in the catalogue", file=path, row=n, field="item_id")
        if u not in histories:
            pos = int(np.searchsorted(split.user_ids, u))
            if pos >= split.num_users or int(split.user_ids[pos]) != u:
                raise DataError(f"user {u} has no interactions in the prepared data", file=path, row=n,
                                field="user_id")
            prefix = split.train_prefix(pos)
            split.check_history(pos, prefix)  # the guard: only train items reach a prompt
            histories[u] = [meta[int(x)] for x in prefix]
        out.append(ExplainRequest(u, c["item_id"], c["rank"], c["score"], meta[c["item_id"]], histories[u],
                                  prefs[u], c["preference_weights"]))
    return out


def settings_from_config(cfg: Any) -> ExplainSettings:
    """:class:`ExplainSettings` from a :class:`~lane_ray.config.LaneConfig` (its ``explain`` and ``preferences``
    sections)."""
    ec = cfg.explain
    return ExplainSettings(budget_tokens=ec.budget_tokens, with_attributes=cfg.preferences.with_attributes,
                           item_noun=cfg.preferences.item_noun, max_why_tokens=ec.max_why_tokens,
                           max_reason_tokens=ec.max_reason_tokens, max_retries=ec.max_retries,
                           temperature=ec.temperature, seed=ec.seed)


def request_key(req: ExplainRequest, model_id: str, settings: ExplainSettings) -> str:
    """SHA-1 of everything an explanation depends on (weights as stored, float32)."""
    payload = [req.user_id, req.item_id, req.rank, repr(float(req.score)), req.preferences,
               [repr(float(w)) for w in np.asarray(req.weights, dtype=np.float32)],
               _history_sha1(req.history), [req.target.title, req.target.genres, req.target.year],
               model_id, EXPLAIN_PROMPT_VERSION, sorted(settings.__dict__.items())]
    return hashlib.sha1(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _item(x: list[Any]) -> HistoryItem:
    return HistoryItem(*x)


def _requests_table(reqs: list[ExplainRequest], keys: list[str]) -> pa.Table:
    return pa.table({
        "user_id": pa.array([r.user_id for r in reqs], pa.int64()),
        "item_id": pa.array([r.item_id for r in reqs], pa.int64()),
        "rank": pa.array([r.rank for r in reqs], pa.int64()),
        "score": pa.array([r.score for r in reqs], pa.float64()),
        "weights": pa.array([[float(w) for w in np.asarray(r.weights, np.float32)] for r in reqs],
                            pa.list_(pa.float32())),
        "preferences": pa.array([r.preferences for r in reqs], pa.list_(pa.string())),
        "history": pa.array([json.dumps([[it.title, it.genres, it.year] for it in r.history]) for r in reqs]),
        "target": pa.array([json.dumps([r.target.title, r.target.genres, r.target.year]) for r in reqs]),
        "key_sha1": pa.array(keys, pa.string()),
    })


class ExplainBatch:
    """Callable class for ``map_batches``: one LLM backend per actor, one :func:`explain_batch` per batch.
    ``backend`` (an instance) replaces ``backend_kind``/``backend_kwargs`` in-process (tests, a shared model)."""

    def __init__(self, backend_kind: str, backend_kwargs: dict[str, Any], settings: dict[str, Any],
                 backend: Any = None, niceness: int | None = None) -> None:
        from lane_ray.pipeline.cluster import set_niceness

        set_niceness(niceness)
        if backend is None:
            from lane_ray.llm import make_backend

            backend = make_backend(backend_kind, **backend_kwargs)
        self.backend = backend
        self.settings = ExplainSettings(**settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        d = batch.to_pydict()
        reqs = [ExplainRequest(u, i, k, s, _item(json.loads(t)), [_item(x) for x in json.loads(h)], p, w)
                for u, i, k, s, w, p, h, t in zip(d["user_id"], d["item_id"], d["rank"], d["score"], d["weights"],
                                                  d["preferences"], d["history"], d["target"], strict=True)]
        results = explain_batch(reqs, self.backend, self.settings, getattr(self.backend, "count_tokens", None))
        rows = []
        for e, key in zip(results, d["key_sha1"], strict=True):
            row = e.to_row()
            row.update(checks=None, key_sha1=key, model=self.backend.model_id, prompt_version=EXPLAIN_PROMPT_VERSION)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA)


def _with_checks(table: pa.Table, threshold: float) -> tuple[pa.Table, dict[str, Any]]:
    """``table`` sorted by user and rank with every row's logic checks, and the batch summary."""
    table = table.sort_by([("user_id", "ascending"), ("rank", "ascending")])
    rows = table.drop_columns(["checks"]).to_pylist()
    checks = compute_checks(rows, threshold)
    idx = table.column_names.index("checks")
    table = table.set_column(idx, "checks", pa.array(checks, CHECKS_TYPE))
    return table, check_rates(rows, checks, threshold)


def run_explanations(requests: list[ExplainRequest], out: Path, checks_path: Path, backend_kind: str,
                     backend_kwargs: dict[str, Any], settings: ExplainSettings, model_id: str, batch_size: int = 16,
                     actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                     use_ray: bool = True, not_copied_threshold: float = 0.5, backend: Any = None,
                     connect: Callable[[], Any] | None = None, niceness: int | None = -5) -> dict[str, Any]:
    """Explain ``requests`` into the part directory ``out`` (only those not cached), recompute the logic
    checks over the current rows, and write the rates to ``checks_path``; returns that summary.
    ``backend`` (in-process mode only) is used instead of constructing one; ``connect`` (e.g. ``init_ray``)
    is called only when there is something to explain with Ray, so a fully cached re-run starts no cluster."""
    if backend is not None and use_ray:
        raise ValueError("an injected backend runs in-process only (use_ray=False)")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    unfinished = remove_unfinished(out)
    keys = [request_key(r, model_id, settings) for r in requests]
    user_ids = np.array([r.user_id for r in requests], dtype=np.int64)
    item_ids = np.array([r.item_id for r in requests], dtype=np.int64)
    current = key64([user_ids, item_ids], keys) if requests else np.zeros(0, np.uint64)
    have = np.zeros(0, np.uint64)
    if part_files(out):
        t = read_parquet(out, columns=["user_id", "item_id", "key_sha1"])
        have = key64([t["user_id"].to_numpy(), t["item_id"].to_numpy()], t["key_sha1"].to_pylist())
    todo = ~np.isin(current, have)
    todo_idx = np.flatnonzero(todo)
    log(f"explain: {len(requests):,} candidates, {len(requests) - todo_idx.size:,} cached, "
        f"{todo_idx.size:,} to explain")
    gen_seconds = 0.0
    with RssSampler() as rss:
        if todo_idx.size:
            table = _requests_table([requests[i] for i in todo_idx], [keys[i] for i in todo_idx])
            settings_d = settings.__dict__.copy()
            t1 = time.perf_counter()
            if use_ray and connect is not None:
                connect()
            ctor = {"backend_kind": backend_kind, "backend_kwargs": backend_kwargs, "settings": settings_d,
                    "niceness": niceness if use_ray else None}  # in-process: never renice the driver
            expect(int(todo_idx.size), NewEntries(out), "explanations")
            map_to_parts(table, ExplainBatch, ctor, out, batch_size, actors, cpus_per_actor, gpus_per_actor,
                         use_ray, worker=ExplainBatch(**ctor, backend=backend) if not use_ray else None)
            gen_seconds = time.perf_counter() - t1
    # compaction: one row per current key, checks recomputed over the whole current batch
    found = read_parquet(out) if part_files(out) else EXPLANATIONS_SCHEMA.empty_table()
    found_keys = key64([found["user_id"].to_numpy(), found["item_id"].to_numpy()],
                       found["key_sha1"].to_pylist()) if found.num_rows else np.zeros(0, np.uint64)
    first = np.zeros(found_keys.size, dtype=bool)
    first[np.unique(found_keys, return_index=True)[1]] = True
    live = found.filter(pa.array(np.isin(found_keys, current) & first)).cast(EXPLANATIONS_SCHEMA)
    if live.num_rows != len(requests):
        raise LaneError(f"{out}: expected {len(requests)} explanations after the run, found {live.num_rows}")
    final, summary = _with_checks(live, not_copied_threshold)
    old = part_files(out)
    write_part(out, final, {b"prompt_version": EXPLAIN_PROMPT_VERSION.encode(), b"model": model_id.encode()})
    for p in old:  # written first, removed after: a crash in between leaves duplicates, never a loss
        p.unlink()
    summary.update({
        "model": model_id, "prompt_version": EXPLAIN_PROMPT_VERSION, "explained_now": int(todo_idx.size),
        "cached": len(requests) - int(todo_idx.size), "seconds": round(time.perf_counter() - t0, 3),
        "generate_seconds": round(gen_seconds, 3), "discarded_unfinished_writes": unfinished,
        "driver_peak_rss_mb": rss.peak_mb, "settings": settings.__dict__.copy(),
    })
    if todo_idx.size and gen_seconds:
        now = final.filter(pa.array(np.isin(key64([final["user_id"].to_numpy(), final["item_id"].to_numpy()],
                                                  final["key_sha1"].to_pylist()), current[todo_idx])))
        toks = int(np.sum(now["new_tokens"].to_numpy()))
        summary["new_tokens"] = toks
        summary["tokens_per_s"] = round(toks / gen_seconds, 1)
        summary["explanations_per_s"] = round(todo_idx.size / gen_seconds, 3)
    write_json(checks_path, summary)
    return summary


def load_requests(run_dir: Path, candidates: Path, top_k: int | None, max_users: int | None) -> list[ExplainRequest]:
    """Validated requests of a run directory: candidates from ``candidates``, preferences from
    ``run_dir/preferences.parquet``, titles and train prefixes from ``run_dir/data/``."""
    from lane_ray.data import read_prepared

    cands = select_candidates(read_candidates(candidates), top_k, max_users)
    if not cands:
        raise DataError(f"no candidate rows with rank <= {top_k}", file=candidates, field="rank")
    prefs_path = run_dir / "preferences.parquet"
    if not prefs_path.exists():
        raise LaneError(f"{prefs_path}: no preferences here; run `lane preferences --out {run_dir}` first")
    if not (run_dir / "data" / "interactions.parquet").exists():
        raise LaneError(f"{run_dir / 'data'}: no prepared data here; run `lane data prepare DATASET --out {run_dir}`")
    prepared = read_prepared(run_dir)
    prefs = read_parquet(prefs_path, columns=["user_id", "preferences"])
    return build_requests(cands, prefs, prepared.interactions, prepared.catalog, candidates, prefs_path)


def read_explanations(path: str | Path) -> pa.Table:
    return read_parquet(path)


__all__ = ["CANDIDATE_COLUMNS", "EXPLANATIONS_SCHEMA", "ExplainBatch", "build_requests", "load_requests",
           "read_candidates", "read_explanations", "request_key", "run_explanations", "select_candidates"]
