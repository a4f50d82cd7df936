"""Whether a run's preferences say something about the user's next items: future-item AUC and its validity
ladder, next to a trivial genre baseline.

    HF_HUB_OFFLINE=1 python benchmarks/preference_quality.py --run runs/default --json
    HF_HUB_OFFLINE=1 python benchmarks/preference_quality.py --run runs/default --json \
        --out-json benchmarks/results/preference_quality_ml100k.json

Reads ``RUN/data/interactions.parquet``, ``RUN/data/catalog.parquet`` and ``RUN/preferences.parquet`` (each a
file or a directory of parts). Users are those with a row in ``preferences.parquet`` and in the data (first
row per user). The leave-one-out split gives each user a train prefix (the history the LLM saw) and future
items, the validation and test items (those that repeat a train item are left out and counted: copying the
history must not score). Definitions in :mod:`lane_ray.llm.quality`.

**The metric (headline).** Every catalogue item is embedded as ``"title (genres; year)"``; an item's score for a
user is the best cosine between it and any of the user's preferences. Per user, the AUC of their future items
against ``--negatives`` (100) negatives: items the user never interacted with, drawn without replacement in
proportion to their interaction counts (all interactions, ``--seed``), the same negatives for every set of
preferences; ties count one half. ``auc`` is the mean over users, ``auc_other`` the same with a fixed random
other user's preferences (``--seed``), and ``auc_own_minus_other`` the per-user difference; intervals are 95 %
percentile bootstraps over users (``--bootstrap`` resamples, ``--seed``). The difference is the headline:
chance for the raw AUC is not 0.5, because what all users' future items share against the negatives (on
ml-100k they are newer, mean year 1990.8 against 1987.8, and lean to action and thrillers) lifts any
genre-like text a little (another user's preferences: 0.52); it cancels in the difference, whose chance is 0.

**The validity ladder.** The same code on preference sets of known quality, best first:
``future_genres`` (the future items' own genres as ``"<genre> movies"``: the answer, a ceiling),
``recent_titles`` (the user's ``--recent`` (5) most recent train titles), ``genre_baseline`` (the history's
``--m`` (5) most frequent genres as ``"<genre> movies"``, padded with decades and generic phrases),
``shuffled`` (another user's preferences from the file: chance). ``ladder_in_order`` is true when the rungs'
mean ``auc_own_minus_other`` falls strictly in that order and ``shuffled``'s 95 % interval of it contains 0;
only then does the metric count. ``ladder_in_order_raw_auc`` is the same test on the raw AUC with chance 0.5
(reported, not required: see above). ``ladder_steps`` gives each adjacent pair's per-user difference of
``auc_own_minus_other`` with its interval (how clearly one rung is above the next).
``llm`` has the same figures for the file's preferences; ``llm_beats_shuffled`` is the per-user AUC difference
llm - shuffled (equal to ``llm.auc_own_minus_other``: shuffled is the other user's preferences) with its
interval, ``beats`` when the interval lies above 0; ``llm_beats_genre_baseline`` likewise against the baseline.

**Kept from before** (inside ``llm`` and ``ladder.genre_baseline``): ``genre_agreement`` (also at the top,
``{"llm", "genre_baseline"}``; only with a ``genres`` column, else null): the fraction of users whose top
history genre (ties: most recent) is the genre name (``"<genre> movies"``) with the highest mean cosine to
their preferences. ``grounding_accuracy``: the old win rate of ``mean_p max_h cos(p, h)`` over held-out titles
against ``--others`` (10) random other users (it sits at chance for every text tried, even recent titles: it
cannot tell good from bad). ``distinctness`` (mean pairwise cosine, lower = more distinct),
``near_twin_rate`` (share of users with two preferences at cosine >= 0.8), ``copies_title_rate``, ``status``
counts.

Prints one JSON line: ``users, model, prompt_version, ladder, llm, ladder_in_order, ladder_in_order_raw_auc,
ladder_steps, llm_beats_shuffled, llm_beats_genre_baseline, genre_agreement, counts`` plus settings and
seconds; ``--out-json PATH`` also writes it. A missing input file fails with a one-line error naming it
(exit 2). ``--write-stand-in`` writes ``RUN/preferences.parquet`` from the genre baseline instead (model
``genre-baseline-stand-in``, no LLM; it never overwrites), to exercise the benchmark on fresh data; the
result then says ``llm_is_stand_in: true``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _results import emit

from lane_ray.data.split import LeaveOneOutSplit
from lane_ray.errors import DataError, LaneError
from lane_ray.io import read_parquet
from lane_ray.llm import quality as q

# The model name --write-stand-in records: its preferences are the genre baseline, written without an LLM.
STAND_IN_MODEL = "genre-baseline-stand-in"


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError("file not found", file=path)
    return path


def _most_common(values: list[str | None]) -> str | None:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _legacy(prefs_text: list[list[str]], prefs_emb: list[np.ndarray], held_emb: list[np.ndarray],
            others: np.ndarray, top: list[str | None] | None, genre_names: list[str],
            genre_emb: np.ndarray | None, titles: list[list[str]], status: dict[str, int]) -> dict[str, Any]:
    """The figures kept from the earlier benchmark (module docstring)."""
    own, other = q.grounding_scores(prefs_emb, held_emb, others)
    genre_agreement = None
    if top is not None and genre_emb is not None:
        closest = [genre_names[i] if (i := q.closest_label(p, genre_emb)) >= 0 else None for p in prefs_emb]
        genre_agreement = q.agreement(top, closest)
    rate = q.copies_title_rate(prefs_text, titles)
    dist = q.distinctness(prefs_emb)
    twins = q.near_twin_rate(prefs_emb)
    return {
        "genre_agreement": None if genre_agreement is None else round(genre_agreement, 4),
        "grounding_accuracy": round(q.win_rate(own, other), 4),
        "grounding_accuracy_se": round(q.standard_error(q.user_win_rates(own, other)), 4),
        "distinctness": None if dist is None else round(dist, 4),
        "near_twin_rate": None if twins is None else round(twins, 4),
        "copies_title_rate": None if rate is None else round(rate, 4),
        "status": status,
    }


def _item_rows(ids: np.ndarray, item_row: dict[int, int], file: Path) -> list[int]:
    try:
        return [item_row[int(x)] for x in ids]
    except KeyError as exc:
        raise DataError(f"item {exc.args[0]} is not in data/catalog.parquet", file=file, field="item_id") from None


def evaluate(run: Path, encoder: Any, others_per_user: int = 10, seed: int = 0, m: int = 5,
             item_noun: str = "movies", negatives: int = 100, n_boot: int = 1000, recent: int = 5) -> dict[str, Any]:
    """The benchmark's result for run directory ``run``; ``encoder`` has ``encode(texts) -> [N, d]`` unit rows."""
    t0 = time.perf_counter()
    inter_file = _require(run / "data" / "interactions.parquet")
    inter = read_parquet(inter_file, columns=["user_id", "item_id", "timestamp"])
    catalog = read_parquet(_require(run / "data" / "catalog.parquet"))
    prefs = read_parquet(_require(run / "preferences.parquet"),
                         columns=["user_id", "preferences", "status", "model", "prompt_version"])
    split = LeaveOneOutSplit.from_interactions(inter)
    cols = catalog.column_names
    has_genres = "genres" in cols
    item_row = {int(i): k for k, i in enumerate(catalog["item_id"].to_pylist())}
    cat_titles = catalog["title"].to_pylist()
    cat_genres = ([q.split_genres(g) for g in catalog["genres"].to_pylist()] if has_genres
                  else [[] for _ in cat_titles])
    cat_years = catalog["year"].to_pylist() if "year" in cols else [None] * catalog.num_rows
    item_texts = [q.item_text(t, g, y) for t, g, y in zip(cat_titles, cat_genres, cat_years, strict=True)]
    popularity = np.bincount(_item_rows(split.items, item_row, inter_file), minlength=catalog.num_rows)

    row_of_user = {int(u): i for i, u in enumerate(split.user_ids.tolist())}
    seen: set[int] = set()
    pick = []  # (split row, preference row), users in preference-file order, first row per user
    for r, u in enumerate(prefs["user_id"].to_pylist()):
        if u in row_of_user and u not in seen:
            seen.add(u)
            pick.append((row_of_user[u], r))
    pick.sort()
    if len(pick) < 2:
        raise DataError(f"needs at least 2 users present in both the data and the preferences, found {len(pick)}",
                        file=run / "preferences.parquet")
    pref_lists = prefs["preferences"].to_pylist()
    pref_status = prefs["status"].to_pylist()
    valid_t, test_t = split.targets("valid"), split.targets("test")

    sets: dict[str, list[list[str]]] = {"llm": [], "recent_titles": [], "genre_baseline": [], "future_genres": []}
    held_text, hist_titles, top, future, seen_rows = [], [], [], [], []
    base_status: Counter[str] = Counter()
    repeats = 0
    for i, r in pick:
        prefix = _item_rows(split.train_prefix(i), item_row, inter_file)
        fut = _item_rows(np.array([valid_t[i], test_t[i]]), item_row, inter_file)
        new = sorted(set(fut) - set(prefix))  # a future item that repeats a train item: copying would find it
        repeats += len(set(fut)) - len(new)
        future.append(np.array(new, dtype=np.int64))
        seen_rows.append(np.array(sorted(set(prefix) | set(fut)), dtype=np.int64))
        hist_titles.append([cat_titles[k] for k in prefix])
        genres_seq = [cat_genres[k] for k in prefix]
        top.append(q.top_genre(genres_seq))
        base, padded = q.genre_baseline(genres_seq, [cat_years[k] for k in prefix], m, item_noun)
        base_status["padded" if padded else "genres"] += 1
        sets["genre_baseline"].append(base)
        sets["llm"].append([p for p in (pref_lists[r] or []) if p is not None])
        sets["recent_titles"].append(list(dict.fromkeys(cat_titles[k] for k in reversed(prefix)))[:recent])
        sets["future_genres"].append(q.genre_phrases([cat_genres[k] for k in new], item_noun))
        held_text.append([cat_titles[k] for k in fut])
    negs = q.popularity_negatives(popularity, seen_rows, negatives, seed)

    genre_names = sorted({g for gs in cat_genres for g in gs})
    genre_text = [f"{g} {item_noun}" for g in genre_names]
    texts = sorted({t for lists in sets.values() for lst in lists for t in lst}
                   | {t for lst in held_text for t in lst} | set(genre_text) | set(item_texts))
    t1 = time.perf_counter()
    emb = encoder.encode(texts)  # [N, d], unit rows
    encode_seconds = time.perf_counter() - t1
    index = {t: k for k, t in enumerate(texts)}

    def rows(lists: list[list[str]]) -> list[np.ndarray]:
        return [emb[[index[t] for t in lst]] if lst else emb[:0] for lst in lists]

    items_emb = emb[[index[t] for t in item_texts]]  # [N_items, d], catalogue order
    embs = {name: rows(lists) for name, lists in sets.items()}
    others = q.other_users(len(pick), seed)
    embs["shuffled"] = [embs["llm"][int(v)] for v in others]

    results, own, other = {}, {}, {}
    for name in (*q.LADDER, "llm"):
        results[name], own[name], other[name] = q.rung(embs[name], items_emb, future, negs, others, n_boot, seed)

    held_emb = rows(held_text)
    genre_emb = emb[[index[t] for t in genre_text]] if genre_text else None
    top_or_none = top if has_genres else None
    legacy_others = q.draw_others(len(pick), others_per_user, seed)
    llm_status = dict(sorted(Counter(pref_status[r] for _, r in pick).items()))
    results["llm"].update(_legacy(sets["llm"], embs["llm"], held_emb, legacy_others, top_or_none, genre_names,
                                  genre_emb, hist_titles, llm_status))
    results["genre_baseline"].update(_legacy(sets["genre_baseline"], embs["genre_baseline"], held_emb,
                                             legacy_others, top_or_none, genre_names, genre_emb, hist_titles,
                                             dict(sorted(base_status.items()))))
    ladder = {name: results[name] for name in q.LADDER}
    chosen = [r for _, r in pick]
    model = _most_common([prefs["model"][r].as_py() for r in chosen])
    return {
        "users": len(pick),
        "model": model,
        # preferences written by --write-stand-in: the "llm" entry then measures the genre baseline, not an LLM
        "llm_is_stand_in": model == STAND_IN_MODEL,
        "prompt_version": _most_common([prefs["prompt_version"][r].as_py() for r in chosen]),
        "ladder": ladder,
        "llm": results["llm"],
        "ladder_in_order": q.ladder_in_order(ladder),
        "ladder_in_order_raw_auc": q.ladder_in_order(ladder, "auc"),
        "ladder_steps": {f"{a}-{b}": q.paired_difference(own[a] - other[a], own[b] - other[b], n_boot, seed)
                         for a, b in zip(q.LADDER[:-1], q.LADDER[1:], strict=True)},
        "llm_beats_shuffled": q.paired_difference(own["llm"], own["shuffled"], n_boot, seed),
        "llm_beats_genre_baseline": q.paired_difference(own["llm"], own["genre_baseline"], n_boot, seed),
        "genre_agreement": {"llm": results["llm"]["genre_agreement"],
                            "genre_baseline": results["genre_baseline"]["genre_agreement"]},
        "counts": {
            "users_without_preferences_in_file": split.num_users - len(pick),
            "users_with_empty_preferences": sum(not p for p in sets["llm"]),
            "users_without_future_items": sum(f.size == 0 for f in future),
            "future_items": int(sum(f.size for f in future)),
            "future_items_repeating_history": repeats,
            "users_with_fewer_negatives": sum(n.size < negatives for n in negs),
            "items": catalog.num_rows,
            "genres": len(genre_names) if has_genres else None,
        },
        "negatives_per_user": negatives,
        "bootstrap_resamples": n_boot,
        "recent_titles": recent,
        "others_per_user": others_per_user,
        "seed": seed,
        "texts_embedded": len(texts),
        "encode_seconds": round(encode_seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def write_stand_in(run: Path, m: int = 5, item_noun: str = "movies") -> Path:
    """Write ``RUN/preferences.parquet`` (canonical schema) with the genre baseline as every user's
    preferences, model ``genre-baseline-stand-in``: exercises the benchmark end to end without an LLM. Its
    ``llm`` entry then measures the baseline, not a model. Refuses to overwrite an existing file."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lane_ray.atomic import atomic_path

    out = run / "preferences.parquet"
    if out.exists():
        raise DataError("exists; the stand-in never replaces preferences", file=out)
    inter_file = _require(run / "data" / "interactions.parquet")
    split = LeaveOneOutSplit.from_interactions(read_parquet(inter_file, columns=["user_id", "item_id", "timestamp"]))
    catalog = read_parquet(_require(run / "data" / "catalog.parquet"))
    item_row = {int(i): k for k, i in enumerate(catalog["item_id"].to_pylist())}
    genres = ([q.split_genres(g) for g in catalog["genres"].to_pylist()] if "genres" in catalog.column_names
              else [[] for _ in range(catalog.num_rows)])
    years = catalog["year"].to_pylist() if "year" in catalog.column_names else [None] * catalog.num_rows
    prefs, shas = [], []
    for i in range(split.num_users):
        prefix = split.train_prefix(i)
        rows = _item_rows(prefix, item_row, inter_file)
        prefs.append(q.genre_baseline([genres[k] for k in rows], [years[k] for k in rows], m, item_noun)[0])
        shas.append(hashlib.sha1(",".join(map(str, prefix.tolist())).encode()).hexdigest())
    n = split.num_users
    table = pa.table({"user_id": pa.array(split.user_ids, pa.int64()),
                      "preferences": pa.array(prefs, pa.list_(pa.string())),
                      "status": ["fallback"] * n, "history_sha1": shas, "model": [STAND_IN_MODEL] * n,
                      "prompt_version": ["genre-baseline"] * n, "raw": [""] * n})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="run directory with data/ and preferences.parquet")
    ap.add_argument("--negatives", type=int, default=100, help="popularity-sampled negatives per user (default 100)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over users (default 1000)")
    ap.add_argument("--recent", type=int, default=5, help="titles in the recent_titles rung (default 5)")
    ap.add_argument("--others", type=int, default=10,
                    help="random other users per user in the kept grounding_accuracy (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--m", type=int, default=5, help="preferences in the genre baseline (default 5)")
    ap.add_argument("--item-noun", default="movies", help='noun of genre names and the baseline ("movies")')
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sentence encoder (packaged name or local dir)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--out-json", type=Path, help="also write the JSON result here")
    ap.add_argument("--write-stand-in", action="store_true",
                    help="write RUN/preferences.parquet from the genre baseline (no LLM) and exit; never overwrites")
    args = ap.parse_args(argv)
    for flag in ("others", "negatives", "bootstrap", "recent", "m"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.write_stand_in:
        try:
            print(write_stand_in(args.run, args.m, args.item_noun))
        except LaneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        for p in (args.run / "data" / "interactions.parquet", args.run / "data" / "catalog.parquet",
                  args.run / "preferences.parquet"):
            _require(p)  # before loading the encoder: fail fast
        from lane_ray.text import TextEncoder

        encoder = TextEncoder(args.encoder, device=args.device, batch_size=args.batch_size,
                              num_threads=args.threads)
        result = evaluate(args.run, encoder, args.others, args.seed, args.m, args.item_noun, args.negatives,
                          args.bootstrap, args.recent)
    except LaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["encoder"] = args.encoder
    if not args.json:
        llm, shuf = result["llm"], result["llm_beats_shuffled"]
        ladder = ", ".join(f"{n} {r['auc']}" for n, r in result["ladder"].items())
        print(f"{result['users']} users, model {result['model']}: AUC {llm['auc']}, minus shuffled {shuf['mean']} "
              f"[{shuf['ci_low']}, {shuf['ci_high']}]; ladder {ladder} (in order: {result['ladder_in_order']}); "
              f"genre agreement {llm['genre_agreement']}", file=sys.stderr)
    return emit(result, out_json=args.out_json)


if __name__ == "__main__":
    sys.exit(main())
