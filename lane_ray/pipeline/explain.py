"""Ray Data stage: recommended (user, item) candidates with the model's attribution -> explanations that state
it (``explanations.parquet``) and the checks that they follow it (``explanation_checks.json``), cached.

Candidates come from ``candidates.parquet`` as the model (``lane evaluate``) or another tool writes it:
``user_id, item_id, rank, score`` and the attribution ``pref_contrib`` (list<float32>, one per preference of
``preferences.parquet``, in its order), ``pref_share`` (float32), ``history_item_ids`` (list<int64>, raw ids)
and ``history_contrib`` (list<float32>), optional ``hit_rate`` (float32, the validation hit rate of the rank).
The attribution is read from the file, never recomputed. ``controls.parquet`` next to it (same schema; random
items ranked below 500) feeds the judge mode's likelihood AUC.

Three kinds of rows are generated in one pass (one actor pool): ``main`` (the explanations), ``counterfactual``
(the main label moved to another preference, for ``follows_attribution``) and, in judge mode, ``control``.
Main rows end in ``explanations.parquet``, the others in ``explanations_aux.parquet``. Rows are keyed by
everything they depend on (attribution, preferences, history, target, settings, prompt version, model): a
re-run only explains what is missing. The checks are recomputed over the whole current batch at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
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
    counterfactual,
    explain_batch,
)
from lane_ray.llm.explain_checks import ROW_CHECKS, Vocabulary, check_rates, compute_checks
from lane_ray.llm.prompts import HistoryItem
from lane_ray.pipeline.keyed_parts import KeyedParts
from lane_ray.progress import llm_rate_key, log
from lane_ray.text.rows import key64

CANDIDATE_COLUMNS = ("user_id", "item_id", "rank", "score", "pref_contrib", "pref_share", "history_item_ids",
                     "history_contrib")
OPTIONAL_COLUMNS = ("hit_rate",)
KINDS = ("main", "counterfactual", "control")

CHECKS_TYPE = pa.struct([
    ("format_ok", pa.bool_()), ("cites_main", pa.bool_()), ("follows_attribution", pa.bool_()),
    ("evidence_valid", pa.bool_()), ("claims", pa.int64()), ("unsupported", pa.int64()),
    ("not_copied", pa.bool_()), ("unique_ratio", pa.float32()), ("fit_spearman", pa.float32()),
    ("closest_preference", pa.int64()), ("cf_closest_preference", pa.int64()),
])
assert tuple(f.name for f in CHECKS_TYPE) == ROW_CHECKS

_ints, _floats, _strs = pa.list_(pa.int64()), pa.list_(pa.float32()), pa.list_(pa.string())
EXPLANATIONS_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_id", pa.int64()), ("rank", pa.int64()), ("score", pa.float64()),
    ("title", pa.string()), ("mode", pa.string()), ("steps", _strs), ("likelihood", pa.string()),
    ("reason", pa.string()), ("because", pa.string()), ("reason_free", pa.string()),
    ("main_preference", pa.string()), ("main_index", pa.int64()), ("preferences", _strs), ("labels", _strs),
    ("order", _ints), ("pref_contrib", _floats), ("pref_share", pa.float32()), ("cites_history", pa.bool_()),
    ("evidence_item_ids", _ints), ("offered_item_ids", _ints), ("valid_item_ids", _ints), ("fit", _floats),
    ("llm_likelihood", pa.string()), ("model_likelihood", pa.string()), ("likelihood_source", pa.string()),
    ("attribution", pa.string()), ("source", pa.string()), ("format_ok", pa.bool_()), ("raw", pa.string()),
    ("new_tokens", pa.int64()), ("attempts", pa.int64()), ("checks", CHECKS_TYPE), ("kind", pa.string()),
    ("key_sha1", pa.string()), ("model", pa.string()), ("prompt_version", pa.string()),
])


# -- candidates --------------------------------------------------------------------------------------------

def _int(v: Any, path: Path, row: int, name: str, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise DataError(f"expected an integer, got {v!r}", file=path, row=row, field=name)
    if minimum is not None and v < minimum:
        raise DataError(f"must be >= {minimum}, got {v!r}", file=path, row=row, field=name)
    return int(v)


def _num(v: Any, path: Path, row: int, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DataError(f"expected a finite number, got {v!r}", file=path, row=row, field=name)
    return float(v)


def _list(v: Any, path: Path, row: int, name: str, conv: Callable[..., Any], empty: bool) -> list[Any]:
    if not isinstance(v, (list, tuple)) or (not empty and not v):
        raise DataError(f"expected a {'' if empty else 'non-empty '}list, got {v!r}", file=path, row=row, field=name)
    return [conv(x, path, row, name) for x in v]


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The JSON objects of a JSON-lines file and their 1-based line numbers (blank lines skipped)."""
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


def read_candidates(path: str | Path) -> list[dict[str, Any]]:
    """Validated candidate rows of a Parquet file or directory, or a JSON-lines file (``.jsonl``, ``.json``,
    ``.ndjson``, one object per line with the same fields): integer ``user_id`` and ``item_id``, ``rank >= 1``
    unique per user, a finite ``score``, ``pref_contrib`` a non-empty list of finite numbers, a finite
    ``pref_share``, ``history_item_ids`` integers and ``history_contrib`` finite numbers of the same length,
    and, when the column exists, ``hit_rate`` in [0, 1] or null. Each row keeps ``_row`` (1-based row, or
    line of a JSON-lines file) for error messages. Bad input raises a one-line DataError naming file, row
    and field."""
    path = Path(path)
    if not path.exists():
        raise DataError("candidates file not found", file=path)
    if path.is_dir() or path.suffix == ".parquet":
        table = read_parquet(path)
        missing = [c for c in CANDIDATE_COLUMNS if c not in table.column_names]
        if missing:
            hint = " (written by `lane evaluate` with the attribution)" if "pref_contrib" in missing else ""
            raise DataError(f"missing column{hint}; found: {', '.join(table.column_names)}", file=path,
                            field=missing[0])
        names = [c for c in (*CANDIDATE_COLUMNS, *OPTIONAL_COLUMNS) if c in table.column_names]
        cols = {c: table[c].to_pylist() for c in names}
        raw = [{c: cols[c][j] for c in names} for j in range(table.num_rows)]
        numbers = list(range(1, table.num_rows + 1))
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        raw, numbers = _read_jsonl(path)
        for r, n in zip(raw, numbers, strict=True):
            for c in CANDIDATE_COLUMNS:
                if c not in r:
                    raise DataError("missing field", file=path, row=n, field=c)
    else:
        raise DataError("unknown candidates format: use .parquet (a file or a directory of parts) or .jsonl",
                        file=path)
    if not raw:
        raise DataError("no candidate rows", file=path)
    out = []
    seen_item: dict[tuple[int, int], int] = {}
    seen_rank: dict[tuple[int, int], int] = {}
    for r, n in zip(raw, numbers, strict=True):
        u = _int(r["user_id"], path, n, "user_id")
        i = _int(r["item_id"], path, n, "item_id")
        k = _int(r["rank"], path, n, "rank", minimum=1)
        s = _num(r["score"], path, n, "score")
        contrib = _list(r["pref_contrib"], path, n, "pref_contrib", _num, empty=False)
        share = _num(r["pref_share"], path, n, "pref_share")
        hids = _list(r["history_item_ids"], path, n, "history_item_ids", _int, empty=True)
        hcon = _list(r["history_contrib"], path, n, "history_contrib", _num, empty=True)
        if len(hids) != len(hcon):
            raise DataError(f"{len(hcon)} values for {len(hids)} history_item_ids", file=path, row=n,
                            field="history_contrib")
        hit = r.get("hit_rate")
        if hit is not None:
            hit = _num(hit, path, n, "hit_rate")
            if not 0.0 <= hit <= 1.0:
                raise DataError(f"must be in [0, 1], got {hit!r}", file=path, row=n, field="hit_rate")
        if (u, i) in seen_item:
            raise DataError(f"user {u} has item {i} twice (also row {seen_item[(u, i)]})", file=path, row=n,
                            field="item_id")
        if (u, k) in seen_rank:
            raise DataError(f"user {u} has rank {k} twice (also row {seen_rank[(u, k)]})", file=path, row=n,
                            field="rank")
        seen_item[(u, i)] = seen_rank[(u, k)] = n
        out.append({"user_id": u, "item_id": i, "rank": k, "score": s, "pref_contrib": contrib, "pref_share": share,
                    "history_item_ids": hids, "history_contrib": hcon, "hit_rate": hit, "_row": n})
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


def catalogue_items(catalog: pa.Table) -> dict[int, HistoryItem]:
    """Item id -> its entry as prompts show it (title, genres, year where the catalogue has them)."""
    cols = catalog.column_names
    return {
        int(i): HistoryItem(t or "", g, str(y) if y is not None else None)
        for i, t, g, y in zip(
            catalog["item_id"].to_pylist(), catalog["title"].to_pylist(),
            catalog["genres"].to_pylist() if "genres" in cols else [None] * catalog.num_rows,
            catalog["year"].to_pylist() if "year" in cols else [None] * catalog.num_rows, strict=True,
        )
    }


def build_requests(cands: list[dict[str, Any]], preferences: pa.Table, interactions: pa.Table, catalog: pa.Table,
                   candidates_path: str | Path, preferences_path: str | Path) -> list[ExplainRequest]:
    """One :class:`ExplainRequest` per candidate row: the user's preferences (from ``preferences``), train
    prefix (leave-one-out, never validation or test items), the target's and the evidence items' catalogue
    entries, and the row's attribution as written. A row naming an unknown user or item, or whose
    ``pref_contrib`` length differs from the user's preference count, raises DataError."""
    from lane_ray.data.split import LeaveOneOutSplit

    for c in ("user_id", "preferences"):
        if c not in preferences.column_names:
            raise DataError("missing column", file=preferences_path, field=c)
    prefs = {int(u): list(p or []) for u, p in zip(preferences["user_id"].to_pylist(),
                                                   preferences["preferences"].to_pylist(), strict=True)}
    meta = catalogue_items(catalog)
    split = LeaveOneOutSplit.from_interactions(interactions)
    histories: dict[int, list[int]] = {}
    out = []
    path = Path(candidates_path)
    for c in cands:
        u, n = c["user_id"], c["_row"]
        if u not in prefs:
            raise DataError(f"user {u} has no preferences in {preferences_path} (run `lane preferences` for them)",
                            file=path, row=n, field="user_id")
        if len(c["pref_contrib"]) != len(prefs[u]):
            raise DataError(f"{len(c['pref_contrib'])} values but user {u} has {len(prefs[u])} preferences",
                            file=path, row=n, field="pref_contrib")
        if c["item_id"] not in meta:
            raise DataError(f"item {c['item_id']} is not in the catalogue", file=path, row=n, field="item_id")
        for h in c["history_item_ids"]:
            if h not in meta:
                raise DataError(f"history item {h} is not in the catalogue", file=path, row=n,
                                field="history_item_ids")
        if u not in histories:
            pos = int(np.searchsorted(split.user_ids, u))
            if pos >= split.num_users or int(split.user_ids[pos]) != u:
                raise DataError(f"user {u} has no interactions in the prepared data", file=path, row=n,
                                field="user_id")
            prefix = split.train_prefix(pos)
            split.check_history(pos, prefix)  # the guard: only train items reach a prompt
            histories[u] = [int(x) for x in prefix]
        hist = histories[u]
        out.append(ExplainRequest(
            u, c["item_id"], c["rank"], c["score"], meta[c["item_id"]], [meta[x] for x in hist], prefs[u],
            c["pref_contrib"], c["pref_share"], hist, c["history_item_ids"], c["history_contrib"],
            [meta[h] for h in c["history_item_ids"]], c.get("hit_rate")))
    return out


def request_to_json(req: ExplainRequest) -> str:
    return json.dumps(asdict(req), ensure_ascii=False)


def request_from_json(text: str) -> ExplainRequest:
    d = json.loads(text)
    d["target"] = HistoryItem(**d["target"])
    d["history"] = [HistoryItem(**h) for h in d["history"]]
    d["evidence"] = [HistoryItem(**h) for h in d["evidence"]]
    return ExplainRequest(**d)


def request_key(req: ExplainRequest, model_id: str, settings: ExplainSettings, kind: str = "main") -> str:
    """SHA-1 of everything an explanation depends on (attribution values as stored, float32)."""
    f32 = lambda xs: [repr(float(x)) for x in np.asarray(xs, dtype=np.float32)]  # noqa: E731
    payload = [kind, req.user_id, req.item_id, req.rank, repr(float(req.score)), req.preferences,
               f32(req.pref_contrib), f32([req.pref_share]), req.evidence_ids, f32(req.evidence_contrib),
               None if req.hit_rate is None else f32([req.hit_rate]), req.history_ids, _history_sha1(req.history),
               [req.target.title, req.target.genres, req.target.year], req.attribution,
               model_id, EXPLAIN_PROMPT_VERSION, sorted(settings.__dict__.items())]
    return hashlib.sha1(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _requests_table(reqs: list[ExplainRequest], keys: list[str], kinds: list[str]) -> pa.Table:
    return pa.table({
        "user_id": pa.array([r.user_id for r in reqs], pa.int64()),
        "item_id": pa.array([r.item_id for r in reqs], pa.int64()),
        "request": pa.array([request_to_json(r) for r in reqs], pa.string()),
        "kind": pa.array(kinds, pa.string()),
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
        reqs = [request_from_json(t) for t in d["request"]]
        results = explain_batch(reqs, self.backend, self.settings, getattr(self.backend, "count_tokens", None))
        rows = []
        for e, key, kind in zip(results, d["key_sha1"], d["kind"], strict=True):
            row = e.to_row()
            row.update(checks=None, kind=kind, key_sha1=key, model=self.backend.model_id,
                       prompt_version=EXPLAIN_PROMPT_VERSION)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA)


def aux_path(out: Path) -> Path:
    """Where the counterfactual and control rows of ``out`` live."""
    return out.with_name(out.name.removesuffix(".parquet") + "_aux.parquet")


def _keys(t: pa.Table) -> np.ndarray:
    if not t.num_rows:
        return np.zeros(0, np.uint64)
    return key64([t["user_id"].to_numpy(), t["item_id"].to_numpy()], t["key_sha1"].to_pylist())


def run_explanations(requests: list[ExplainRequest], out: Path, checks_path: Path, backend_kind: str,
                     backend_kwargs: dict[str, Any], settings: ExplainSettings, model_id: str, batch_size: int = 16,
                     actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                     use_ray: bool = True, not_copied_threshold: float = 0.5, backend: Any = None,
                     connect: Callable[[], Any] | None = None, niceness: int | None = -5, encoder: Any = None,
                     vocab: Vocabulary | None = None, controls: list[ExplainRequest] | None = None,
                     follows: bool = True) -> dict[str, Any]:
    """Explain ``requests`` into the part directory ``out`` (only those not cached), with their counterfactuals
    (``follows``) and, in judge mode, ``controls`` into :func:`aux_path`; recompute the checks over the current
    rows and write the summary to ``checks_path``; returns it. ``encoder`` (a
    :class:`~lane_ray.text.TextEncoder`) enables the embedding checks, ``vocab`` the claims check.
    ``backend`` (in-process mode only) is used instead of constructing one; ``connect`` (e.g. ``init_ray``) is
    called only when there is something to explain with Ray, so a fully cached re-run starts no cluster."""
    if backend is not None and use_ray:
        raise ValueError("an injected backend runs in-process only (use_ray=False)")
    t0 = time.perf_counter()
    aux = aux_path(out)
    parts = KeyedParts([out, aux], _keys, ["user_id", "item_id", "key_sha1"], EXPLANATIONS_SCHEMA)
    jobs: list[tuple[ExplainRequest, str]] = [(r, "main") for r in requests]
    if follows:
        jobs += [(cf, "counterfactual") for cf in (counterfactual(r, settings) for r in requests) if cf is not None]
    if settings.mode == "judge":
        jobs += [(c, "control") for c in controls or []]
    reqs = [j[0] for j in jobs]
    kinds = [j[1] for j in jobs]
    keys = [request_key(r, model_id, settings, k) for r, k in jobs]
    current = key64([np.array([r.user_id for r in reqs], np.int64), np.array([r.item_id for r in reqs], np.int64)],
                    keys) if jobs else np.zeros(0, np.uint64)
    todo_idx = parts.missing(current)
    n_main = len(requests)
    log(f"explain: {n_main:,} candidates ({len(jobs) - n_main:,} counterfactual/control rows), "
        f"{len(jobs) - todo_idx.size:,} cached, {todo_idx.size:,} to explain")
    if todo_idx.size:
        table = _requests_table([reqs[i] for i in todo_idx], [keys[i] for i in todo_idx],
                                [kinds[i] for i in todo_idx])
        ctor = {"backend_kind": backend_kind, "backend_kwargs": backend_kwargs, "settings": settings.__dict__.copy(),
                "niceness": niceness if use_ray else None}  # in-process: never renice the driver
        parts.generate(table, ExplainBatch, ctor, batch_size, actors, cpus_per_actor, gpus_per_actor, use_ray,
                       "explanations", llm_rate_key("explanations", backend_kind, model_id, gpus_per_actor),
                       connect=connect, worker=ExplainBatch(**ctor, backend=backend) if not use_ray else None)
    gen_seconds = parts.generate_seconds
    # one row per current key; main rows in `out` with their checks, the others in `aux`
    live, _ = parts.live(current)
    if live.num_rows != len(jobs):
        raise LaneError(f"{out}: expected {len(jobs)} explanations after the run, found {live.num_rows}")
    live = live.sort_by([("user_id", "ascending"), ("rank", "ascending")])
    kind = np.array(live["kind"].to_pylist())
    main = live.filter(pa.array(kind == "main"))
    rest = live.filter(pa.array(kind != "main"))
    rows = main.drop_columns(["checks"]).to_pylist()
    rest_rows = rest.drop_columns(["checks"]).to_pylist()
    cfs = {(r["user_id"], r["item_id"]): r for r in rest_rows if r["kind"] == "counterfactual"}
    encode = encoder.encode if encoder is not None else None
    checks = compute_checks(rows, not_copied_threshold, encode, vocab, cfs)
    main = main.set_column(main.column_names.index("checks"), "checks", pa.array(checks, CHECKS_TYPE))
    summary = check_rates(rows, checks, not_copied_threshold, vocab,
                          [r for r in rest_rows if r["kind"] == "control"])
    parts.replace([(out, main), (aux, rest)],
                  {b"prompt_version": EXPLAIN_PROMPT_VERSION.encode(), b"model": model_id.encode()})
    summary.update({
        "model": model_id, "prompt_version": EXPLAIN_PROMPT_VERSION, "explained_now": int(todo_idx.size),
        "cached": len(jobs) - int(todo_idx.size), "counterfactuals": len(cfs),
        "controls": int((kind == "control").sum()),
        "encoder": getattr(encoder, "model_id", None) or (type(encoder).__name__ if encoder is not None else None),
        "seconds": round(time.perf_counter() - t0, 3), "generate_seconds": round(gen_seconds, 3),
        "discarded_unfinished_writes": parts.unfinished, "driver_peak_rss_mb": parts.peak_rss_mb,
        "settings": settings.__dict__.copy(),
    })
    if todo_idx.size and gen_seconds:
        now_keys = set(keys[i] for i in todo_idx)
        toks = int(sum(t for t, k in zip(live["new_tokens"].to_pylist(), live["key_sha1"].to_pylist(), strict=True)
                       if k in now_keys))
        summary["new_tokens"] = toks
        summary["tokens_per_s"] = round(toks / gen_seconds, 1)
        summary["explanations_per_s"] = round(todo_idx.size / gen_seconds, 3)
        summary["seconds_per_explanation"] = round(gen_seconds / todo_idx.size, 3)
    write_json(checks_path, summary)
    return summary


def load_requests(run_dir: Path, candidates: Path, top_k: int | None, max_users: int | None,
                  controls: bool = False) -> tuple[list[ExplainRequest], list[ExplainRequest], Vocabulary]:
    """Validated requests of a run directory: candidates from ``candidates``, preferences from
    ``run_dir/preferences.parquet``, titles and train prefixes from ``run_dir/data/``; with ``controls``, the
    negative controls of the same users from ``controls.parquet`` beside the candidates (empty when absent);
    and the catalogue's :class:`Vocabulary`."""
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
    reqs = build_requests(cands, prefs, prepared.interactions, prepared.catalog, candidates, prefs_path)
    ctrl: list[ExplainRequest] = []
    cpath = Path(candidates).with_name("controls.parquet")
    if controls and cpath.exists():
        users = {r.user_id for r in reqs}
        rows = [c for c in read_candidates(cpath) if c["user_id"] in users]
        ctrl = build_requests(rows, prefs, prepared.interactions, prepared.catalog, cpath, prefs_path)
    cat = prepared.catalog
    vocab = Vocabulary({i: (h.genres, h.year) for i, h in catalogue_items(cat).items()})
    return reqs, ctrl, vocab


def read_explanations(path: str | Path) -> pa.Table:
    return read_parquet(path)


__all__ = ["CANDIDATE_COLUMNS", "EXPLANATIONS_SCHEMA", "KINDS", "ExplainBatch", "aux_path", "build_requests",
           "catalogue_items", "load_requests", "read_candidates", "read_explanations", "request_from_json",
           "request_key", "request_to_json", "run_explanations", "select_candidates"]
