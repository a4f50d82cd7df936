"""How grounded a run's preferences are, with no human in the loop, next to a trivial genre baseline.

    HF_HUB_OFFLINE=1 python benchmarks/preference_quality.py --run runs/default --json

Reads ``RUN/data/interactions.parquet``, ``RUN/data/catalog.parquet`` and ``RUN/preferences.parquet`` (each a
file or a directory of parts). Users are those with a row in ``preferences.parquet`` and in the data (first
row per user). The leave-one-out split of the data gives each user u a train prefix (the history the LLM
saw) and held-out items ``H_u = {validation item, test item}``. Preferences, held-out titles and genre
names are embedded with one sentence encoder (``--encoder``, default the offline MiniLM; unit-norm rows).
The metrics (definitions in :mod:`lane_ray.llm.quality`):

- ``grounding_accuracy``: with ``score(P, H) = mean over p in P of max over h in H of cos(p, h)``, the
  fraction of comparisons ``score(P_u, H_u) > score(P_u, H_v)`` won, over every user u and ``--others``
  (default 10) random other users v per user (uniform, with replacement, never u, ``--seed``); a tie counts
  one half. ``grounding_accuracy_single`` is the same with the first draw only (one other user per user);
  ``grounding_accuracy_se`` the standard error over users of the per-user fraction. 0.5 is chance:
  preferences that say nothing about the user's next items. ``mean_own_score`` / ``mean_other_score``
  are the mean scores against the user's own and the others' held-out items.
- ``genre_agreement`` (only where the catalogue has a ``genres`` column, else null): the fraction of users
  whose top genre by history (most frequent in the train prefix, "|"-separated, "unknown" ignored; ties: the
  genre seen most recently) is the genre whose name (embedded as ``"<genre> <item noun>"``) has the highest
  mean cosine to the user's preferences. Users whose history has no genre are left out of it.
- ``distinctness``: mean pairwise cosine between one user's preferences, averaged over users (lower = more
  distinct).
- ``copies_title_rate``: share of preferences that restate a history title (``parsing.copies_title``).
- ``status``: counts of the ``status`` column (ok / repaired / fallback) over the users evaluated.

The same metrics, on the same users and the same random others, are computed for ``genre_baseline``: the 5
(``--m``) most frequent genres of the history as ``"<genre> movies"``, padded with decades and generic
phrases when the history has fewer genres (its ``status`` counts ``genres`` vs ``padded``).
``beats_baseline``: the preferences' ``grounding_accuracy`` exceeds the baseline's (target: also >= 0.8).

Prints one JSON line: ``users, model, prompt_version, llm {...}, genre_baseline {...}, beats_baseline`` plus
settings and seconds; ``--out-json PATH`` also writes it. A missing input file fails with a one-line error
naming it (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lane_ray.data.split import LeaveOneOutSplit
from lane_ray.errors import DataError, LaneError
from lane_ray.io import read_parquet
from lane_ray.llm import quality as q


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError("file not found", file=path)
    return path


def _most_common(values: list[str | None]) -> str | None:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _metrics(prefs_text: list[list[str]], prefs_emb: list[np.ndarray], held_emb: list[np.ndarray],
             others: np.ndarray, top: list[str | None] | None, genre_names: list[str],
             genre_emb: np.ndarray | None, titles: list[list[str]], status: dict[str, int]) -> dict[str, Any]:
    own, other = q.grounding_scores(prefs_emb, held_emb, others)
    genre_agreement = None
    if top is not None and genre_emb is not None:
        closest = [genre_names[i] if (i := q.closest_label(p, genre_emb)) >= 0 else None for p in prefs_emb]
        genre_agreement = q.agreement(top, closest)
    rate = q.copies_title_rate(prefs_text, titles)
    dist = q.distinctness(prefs_emb)
    return {
        "grounding_accuracy": round(q.win_rate(own, other), 4),
        "grounding_accuracy_se": round(q.standard_error(q.user_win_rates(own, other)), 4),
        "grounding_accuracy_single": round(q.win_rate(own, other[:, :1]), 4),
        "genre_agreement": None if genre_agreement is None else round(genre_agreement, 4),
        "distinctness": None if dist is None else round(dist, 4),
        "copies_title_rate": None if rate is None else round(rate, 4),
        "status": status,
        "mean_own_score": round(float(np.nanmean(own)), 4),
        "mean_other_score": round(float(np.nanmean(other)), 4),
    }


def evaluate(run: Path, encoder: Any, others_per_user: int = 10, seed: int = 0, m: int = 5,
             item_noun: str = "movies") -> dict[str, Any]:
    """The benchmark's result for run directory ``run``; ``encoder`` has ``encode(texts) -> [N, d]`` unit rows."""
    t0 = time.perf_counter()
    inter = read_parquet(_require(run / "data" / "interactions.parquet"), columns=["user_id", "item_id", "timestamp"])
    catalog = read_parquet(_require(run / "data" / "catalog.parquet"))
    prefs = read_parquet(_require(run / "preferences.parquet"),
                         columns=["user_id", "preferences", "status", "model", "prompt_version"])
    split = LeaveOneOutSplit.from_interactions(inter)
    cols = catalog.column_names
    has_genres = "genres" in cols
    item_row = {int(i): k for k, i in enumerate(catalog["item_id"].to_pylist())}
    cat_titles = catalog["title"].to_pylist()
    cat_genres = [q.split_genres(g) for g in catalog["genres"].to_pylist()] if has_genres else None
    cat_years = catalog["year"].to_pylist() if "year" in cols else [None] * catalog.num_rows

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

    llm_text, base_text, held_text, hist_titles, top = [], [], [], [], []
    base_status: Counter[str] = Counter()
    for i, r in pick:
        prefix = [item_row[int(x)] for x in split.train_prefix(i)]
        hist_titles.append([cat_titles[k] for k in prefix])
        genres_seq = [cat_genres[k] for k in prefix] if cat_genres is not None else []
        top.append(q.top_genre(genres_seq))
        base, padded = q.genre_baseline(genres_seq, [cat_years[k] for k in prefix], m, item_noun)
        base_text.append(base)
        base_status["padded" if padded else "genres"] += 1
        llm_text.append([p for p in (pref_lists[r] or []) if p is not None])
        held_text.append([cat_titles[item_row[int(valid_t[i])]], cat_titles[item_row[int(test_t[i])]]])

    genre_names = sorted({g for gs in cat_genres for g in gs}) if cat_genres is not None else []
    genre_text = [f"{g} {item_noun}" for g in genre_names]
    texts = sorted({t for lst in (*llm_text, *base_text, *held_text) for t in lst} | set(genre_text))
    t1 = time.perf_counter()
    emb = encoder.encode(texts)  # [N, d], unit rows
    encode_seconds = time.perf_counter() - t1
    index = {t: k for k, t in enumerate(texts)}

    def rows(lists: list[list[str]]) -> list[np.ndarray]:
        return [emb[[index[t] for t in lst]] if lst else emb[:0] for lst in lists]

    held_emb = rows(held_text)
    genre_emb = emb[[index[t] for t in genre_text]] if genre_text else None
    others = q.draw_others(len(pick), others_per_user, seed)
    llm_status = dict(sorted(Counter(pref_status[r] for _, r in pick).items()))
    top_or_none = top if cat_genres is not None else None
    llm = _metrics(llm_text, rows(llm_text), held_emb, others, top_or_none, genre_names, genre_emb, hist_titles,
                   llm_status)
    baseline = _metrics(base_text, rows(base_text), held_emb, others, top_or_none, genre_names, genre_emb,
                        hist_titles, dict(sorted(base_status.items())))
    chosen = [r for _, r in pick]
    return {
        "users": len(pick),
        "model": _most_common([prefs["model"][r].as_py() for r in chosen]),
        "prompt_version": _most_common([prefs["prompt_version"][r].as_py() for r in chosen]),
        "llm": llm,
        "genre_baseline": baseline,
        "beats_baseline": bool(llm["grounding_accuracy"] > baseline["grounding_accuracy"]),
        "target_met": bool(llm["grounding_accuracy"] >= 0.8),
        "users_without_preferences": split.num_users - len(pick),
        "genres": len(genre_names) if cat_genres is not None else None,
        "others_per_user": others_per_user,
        "seed": seed,
        "texts_embedded": len(texts),
        "encode_seconds": round(encode_seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="run directory with data/ and preferences.parquet")
    ap.add_argument("--others", type=int, default=10, help="random other users per user (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--m", type=int, default=5, help="preferences in the genre baseline (default 5)")
    ap.add_argument("--item-noun", default="movies", help='noun of genre names and the baseline ("movies")')
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sentence encoder (packaged name or local dir)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--out-json", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.others < 1:
        ap.error("--others must be at least 1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        for p in (args.run / "data" / "interactions.parquet", args.run / "data" / "catalog.parquet",
                  args.run / "preferences.parquet"):
            _require(p)  # before loading the encoder: fail fast
        from lane_ray.text import TextEncoder

        encoder = TextEncoder(args.encoder, device=args.device, batch_size=args.batch_size,
                              num_threads=args.threads)
        result = evaluate(args.run, encoder, args.others, args.seed, args.m, args.item_noun)
    except LaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["encoder"] = args.encoder
    line = json.dumps(result)
    if not args.json:
        llm, base = result["llm"], result["genre_baseline"]
        print(f"{result['users']} users, model {result['model']}: grounding {llm['grounding_accuracy']} vs genre "
              f"baseline {base['grounding_accuracy']} (beats baseline: {result['beats_baseline']})", file=sys.stderr)
    print(line)
    if args.out_json:
        args.out_json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
