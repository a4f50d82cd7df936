"""Preference-quality metrics (lane_ray.llm.quality) against values computed by hand, and the benchmark's
reading and reporting with stand-in encoders (no model): one-hot texts, or word counts."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lane_ray.llm import quality as q

E1, E2, E3 = np.eye(3, dtype=np.float32)
ROOT = Path(__file__).resolve().parents[2]


def test_set_score_is_mean_of_best_match():
    prefs = np.array([[1, 0], [0, 1]], np.float32)
    items = np.array([[1, 0], [0.6, 0.8]], np.float32)
    # cos = [[1, 0.6], [0, 0.8]] -> best per preference [1, 0.8] -> mean 0.9
    assert q.set_score(prefs, items) == pytest.approx(0.9)
    assert math.isnan(q.set_score(prefs[:0], items))


def test_grounding_win_rates_ties_and_standard_error():
    prefs = [np.stack([E1]), np.stack([E2]), np.stack([E1])]
    held = [np.stack([E1]), np.stack([E2]), np.stack([E3])]
    others = np.array([[1, 2], [0, 2], [0, 1]])
    own, other = q.grounding_scores(prefs, held, others)
    assert own.tolist() == [1, 1, 0]
    assert other.tolist() == [[0, 0], [0, 0], [1, 0]]
    # user 2 loses to user 0 and ties with user 1: 0 + 1/2 over 2 comparisons
    assert q.user_win_rates(own, other).tolist() == [1, 1, 0.25]
    assert q.win_rate(own, other) == pytest.approx(0.75)
    assert q.win_rate(own, other[:, :1]) == pytest.approx(2 / 3)  # single draw
    # per-user [1, 1, 0.25]: sample variance 0.1875, se = sqrt(0.1875 / 3) = 0.25
    assert q.standard_error(q.user_win_rates(own, other)) == pytest.approx(0.25)


def test_missing_preferences_lose_every_comparison():
    prefs = [np.zeros((0, 3), np.float32), np.stack([E2])]
    held = [np.stack([E1]), np.stack([E2])]
    own, other = q.grounding_scores(prefs, held, np.array([[1], [0]]))
    assert math.isnan(own[0])
    assert q.user_win_rates(own, other).tolist() == [0, 1]


def test_draw_others_never_draws_self():
    others = q.draw_others(3, 200, seed=0)
    assert others.shape == (3, 200)
    for u in range(3):
        assert set(others[u].tolist()) == {0, 1, 2} - {u}
    assert np.array_equal(others, q.draw_others(3, 200, seed=0))
    with pytest.raises(ValueError):
        q.draw_others(1, 1, seed=0)


def test_top_genre_by_count_then_recency():
    seq = [["Drama", "Comedy"], ["Action"], ["Comedy"], ["Drama"]]
    assert q.ranked_genres(seq) == ["Drama", "Comedy", "Action"]  # Drama and Comedy 2 each, Drama later
    assert q.top_genre([["Drama"], ["Comedy"]]) == "Comedy"
    assert q.top_genre([[], []]) is None
    assert q.split_genres("Action|unknown||Comedy ") == ["Action", "Comedy"]
    assert q.split_genres(None) == []


def test_closest_label_and_agreement():
    prefs = np.array([[1, 0], [0.6, 0.8]], np.float32)
    labels = np.array([[1, 0], [0, 1]], np.float32)
    assert q.closest_label(prefs, labels) == 0  # mean cos [0.8, 0.4]
    assert q.closest_label(prefs[1:], labels) == 1  # [0.6, 0.8]
    assert q.closest_label(prefs[:0], labels) == -1
    assert q.agreement(["A", None, "B", "C"], ["A", "X", "C", "C"]) == pytest.approx(2 / 3)
    assert q.agreement([None], ["A"]) is None


def test_distinctness_is_mean_pairwise_cosine():
    a = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)  # pairs: 0, 0.6, 0.8 -> 1.4 / 3
    b = np.array([[1, 0], [1, 0]], np.float32)  # 1
    single = np.array([[1, 0]], np.float32)  # no pair: left out
    assert q.distinctness([a, b, single]) == pytest.approx((1.4 / 3 + 1) / 2)
    assert q.distinctness([single]) is None


def test_near_twin_rate_counts_users_with_two_preferences_at_the_threshold():
    a = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)  # closest pair 0.8: a near-twin
    b = np.array([[1, 0], [0, 1]], np.float32)  # 0
    single = np.array([[1, 0]], np.float32)  # no pair: left out
    assert q.near_twin_rate([a, b, single]) == pytest.approx(0.5)
    assert q.near_twin_rate([a, b], threshold=0.81) == 0.0
    assert q.near_twin_rate([single]) is None


def test_copies_title_rate():
    prefs = [["Toy Story", "animated comedies"], ["Heat", "crime dramas"]]
    titles = [["Toy Story", "Casino"], ["Heat"]]
    assert q.copies_title_rate(prefs, titles) == pytest.approx(2 / 4)
    assert q.copies_title_rate([[]], [["Heat"]]) is None


def test_genre_baseline_ranks_genres_and_pads():
    seq = [["Drama", "Comedy"], ["Drama"], ["Action"]]
    years = ["1995", "1987", "1994"]
    prefs, padded = q.genre_baseline(seq, years, 5)
    assert prefs == ["Drama movies", "Action movies", "Comedy movies", "movies from the 1990s",
                     "movies from the 1980s"]
    assert padded
    assert q.genre_baseline(seq, years, 2) == (["Drama movies", "Action movies"], False)
    assert q.genre_baseline([[]], [None], 2, "games") == (["popular games", "well-reviewed games"], True)


# --- future-item AUC and its validity ladder --------------------------------------------------------------

def test_item_text_renders_title_genres_year():
    assert q.item_text("Toy Story", ["Animation", "Comedy"], "1995") == "Toy Story (Animation, Comedy; 1995)"
    assert q.item_text("Heat (1995)", ["Crime"], "1995") == "Heat (Crime; 1995)"  # the year is not said twice
    assert q.item_text("Heat", [], "1995") == "Heat (1995)"
    assert q.item_text("Heat", ["Crime"], None) == "Heat (Crime)"
    assert q.item_text(" Heat ", [], "") == "Heat"
    assert q.genre_phrases([["Drama"], ["Comedy", "Drama"]]) == ["Drama movies", "Comedy movies"]


def test_item_scores_take_the_best_preference():
    prefs = np.array([[1, 0], [0, 1]], np.float32)
    items = np.array([[1, 0], [0.6, 0.8], [-1, 0]], np.float32)
    assert q.item_scores(prefs, items) == pytest.approx([1, 0.8, 0])
    assert np.isnan(q.item_scores(prefs[:0], items)).all()


def test_auc_counts_pairs_and_ties_half():
    # pairs: 0.9 beats both, 0.5 ties 0.5 and beats 0.1 -> (2 + 0.5 + 1) / 4
    assert q.auc(np.array([0.9, 0.5]), np.array([0.5, 0.1])) == pytest.approx(0.875)
    assert q.auc(np.array([0.2]), np.array([0.2, 0.2])) == 0.5
    assert q.auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert math.isnan(q.auc(np.array([]), np.array([1.0])))
    assert math.isnan(q.auc(np.array([np.nan]), np.array([1.0])))


def test_user_aucs_on_hand_made_embeddings():
    items = np.stack([E1, E2, E3, (E1 + E2) / np.sqrt(2)])  # rows 0..3
    prefs = [np.stack([E1]), np.stack([E2]), np.zeros((0, 3), np.float32), np.stack([E3])]
    future = [np.array([0]), np.array([0, 1]), np.array([0]), np.array([], np.int64)]
    negs = [np.array([1, 2, 3]), np.array([2, 3]), np.array([1]), np.array([0])]
    a = q.user_aucs(prefs, items, future, negs)
    # user 0: 1 vs [0, 0, .707] -> 1; user 1: [0, 1] vs [0, .707] -> (0.5 + 0 + 1 + 1) / 4
    assert a[:2] == pytest.approx([1.0, 0.625])
    assert np.isnan(a[2]) and np.isnan(a[3])  # no preference; no future item


def test_popularity_negatives_exclude_seen_and_follow_popularity():
    pop = np.array([0, 1, 3, 6, 10])
    seen = [np.array([4])] * 20000
    draws = q.popularity_negatives(pop, seen, 1, seed=0)
    counts = np.bincount(np.concatenate(draws), minlength=5) / len(draws)
    assert counts[0] == 0 and counts[4] == 0  # never popular, or seen
    assert counts[1:4] == pytest.approx([0.1, 0.3, 0.6], abs=0.015)  # in proportion to 1 : 3 : 6
    many = q.popularity_negatives(pop, [np.array([1]), np.array([], np.int64)], 100, seed=3)
    assert [m.tolist() for m in many] == [[2, 3, 4], [1, 2, 3, 4]]  # all the eligible, each once
    two = q.popularity_negatives(np.ones(50), [np.array([0, 1])] * 3, 10, seed=7)
    assert all(len(set(d.tolist())) == 10 and not {0, 1} & set(d.tolist()) for d in two)
    assert [d.tolist() for d in two] == [d.tolist() for d in q.popularity_negatives(np.ones(50), [np.array([0, 1])] * 3,
                                                                                       10, seed=7)]


def test_bootstrap_ci_brackets_the_mean():
    v = np.random.default_rng(0).normal(0.3, 0.1, size=400)
    mean, low, high = q.bootstrap_ci(np.append(v, np.nan), n_boot=500, seed=1)  # NaN left out
    assert mean == pytest.approx(v.mean())
    assert low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * v.std() / 20, rel=0.2)  # ~ the normal interval
    assert q.bootstrap_ci(np.full(5, 0.7)) == pytest.approx((0.7, 0.7, 0.7))
    assert all(math.isnan(x) for x in q.bootstrap_ci(np.array([np.nan])))
    s = q.summary(np.array([0.5, np.nan, 1.0]))
    assert s["mean"] == 0.75 and s["users"] == 2 and 0.5 <= s["ci_low"] <= s["ci_high"] <= 1.0


def test_rung_compares_own_with_another_users_preferences():
    items = np.stack([E1, E2, E3])
    prefs = [np.stack([E1]), np.stack([E2])]
    future = [np.array([0]), np.array([1])]
    negs = [np.array([1, 2]), np.array([0, 2])]
    summary, own, other = q.rung(prefs, items, future, negs, q.other_users(2, seed=0), n_boot=100)
    assert own.tolist() == [1.0, 1.0]
    assert other.tolist() == [0.25, 0.25]  # the other's vector: 0 against [1, 0] -> (0 + 0.5) / 2
    assert summary["auc"] == 1.0 and summary["auc_other"] == 0.25 and summary["users"] == 2
    assert summary["auc_own_minus_other"]["mean"] == 0.75
    d = q.paired_difference(own, other)
    assert d["beats"] and d["ci_excludes_zero"] and d["ci_low"] == 0.75
    assert q.paired_difference(other, own)["ci_excludes_zero"] and not q.paired_difference(other, own)["beats"]


def _rung(mean: float, low: float, high: float, auc: float = 0.6) -> dict:
    return {"auc": auc, "auc_ci_low": auc - 0.01, "auc_ci_high": auc + 0.01,
            "auc_own_minus_other": {"mean": mean, "ci_low": low, "ci_high": high}}


def test_ladder_order_needs_strict_order_and_shuffled_at_chance():
    good = {"future_genres": _rung(0.2, 0.18, 0.22, 0.75), "recent_titles": _rung(0.04, 0.02, 0.06, 0.55),
            "genre_baseline": _rung(0.03, 0.02, 0.04, 0.54), "shuffled": _rung(0.002, -0.005, 0.01, 0.52)}
    assert q.ladder_in_order(good)
    assert not q.ladder_in_order(good, "auc")  # raw AUC: shuffled's [0.51, 0.53] misses 0.5
    assert q.ladder_in_order({**good, "shuffled": _rung(0.0, -0.01, 0.01, 0.5)}, "auc")
    assert not q.ladder_in_order({**good, "recent_titles": _rung(0.03, 0.01, 0.05)})  # a tie is not in order
    assert not q.ladder_in_order({**good, "genre_baseline": _rung(0.05, 0.04, 0.06)})  # swapped
    assert not q.ladder_in_order({**good, "shuffled": _rung(0.01, 0.005, 0.015)})  # above chance
    assert not q.ladder_in_order({k: v for k, v in good.items() if k != "recent_titles"})
    assert not q.ladder_in_order({**good, "future_genres": _rung(None, None, None)})  # type: ignore[arg-type]


# --- the benchmark, end to end with a stand-in encoder ---------------------------------------------------

class OneHotEncoder:
    """Every distinct text its own axis: cosine 1 for equal texts, 0 otherwise."""

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.eye(len(texts), dtype=np.float32)


def _bench():
    if str(ROOT / "benchmarks") not in sys.path:  # the benchmark imports its sibling _results.py, as when run
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("preference_quality", ROOT / "benchmarks" / "preference_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_run(run: Path, genres: bool = True, parts: bool = False) -> None:
    """Users 1..3: two train items of one genre each (Action, Comedy, Drama), then validation and test items.
    User u's preferences: its validation title and a phrase of its own."""
    rows = [(u, 10 * u + k, k) for u in (1, 2, 3) for k in range(1, 5)]
    (run / "data").mkdir(parents=True)
    pq.write_table(pa.table({c: pa.array([r[j] for r in rows], pa.int64())
                             for j, c in enumerate(["user_id", "item_id", "timestamp"])}),
                   run / "data" / "interactions.parquet")
    genre = {1: "Action", 2: "Comedy", 3: "Drama"}
    cat = {"item_id": pa.array([r[1] for r in rows], pa.int64()), "title": [f"Film {r[1]}" for r in rows],
           "year": ["1995"] * len(rows)}
    if genres:
        cat["genres"] = [genre[r[0]] if r[2] <= 2 else "Western" for r in rows]
    pq.write_table(pa.table(cat), run / "data" / "catalog.parquet")
    prefs = pa.table({"user_id": pa.array([1, 2, 3], pa.int64()),
                      "preferences": [[f"Film {10 * u + 3}", f"taste of user {u}"] for u in (1, 2, 3)],
                      "status": ["ok", "ok", "fallback"], "model": ["m"] * 3, "prompt_version": ["v"] * 3})
    if parts:
        (run / "preferences.parquet").mkdir()
        pq.write_table(prefs.slice(0, 2), run / "preferences.parquet" / "part-a.parquet")
        pq.write_table(prefs.slice(2), run / "preferences.parquet" / "part-b.parquet")
    else:
        pq.write_table(prefs, run / "preferences.parquet")


class WordEncoder:
    """Word counts as vectors, unit-normed: texts sharing words have a positive cosine."""

    def encode(self, texts: list[str]) -> np.ndarray:
        words = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
        vocab = {w: k for k, w in enumerate(sorted({w for ws in words for w in ws}))}
        out = np.zeros((len(texts), len(vocab)), np.float32)
        for r, ws in enumerate(words):
            for w in ws:
                out[r, vocab[w]] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _write_genre_run(run: Path, repeat_user: bool = False) -> None:
    """Users 1..4 watch only one genre each (Action, Comedy, Drama, Western): three train items, then
    validation and test items, titles "Film <id>". Their preferences copy their three train titles. With
    ``repeat_user``, user 5's validation and test items repeat its first train item."""
    genre = {1: "Action", 2: "Comedy", 3: "Drama", 4: "Western", 5: "Horror"}
    rows = [(u, 10 * u + k, k) for u in (1, 2, 3, 4) for k in range(1, 6)]
    if repeat_user:
        rows += [(5, 51, 1), (5, 52, 2), (5, 53, 3), (5, 51, 4), (5, 51, 5)]
    (run / "data").mkdir(parents=True)
    pq.write_table(pa.table({c: pa.array([r[j] for r in rows], pa.int64())
                             for j, c in enumerate(["user_id", "item_id", "timestamp"])}),
                   run / "data" / "interactions.parquet")
    ids = sorted({r[1] for r in rows})
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "title": [f"Film {i}" for i in ids],
                             "genres": [genre[i // 10] for i in ids], "year": ["1995"] * len(ids)}),
                   run / "data" / "catalog.parquet")
    users = sorted({r[0] for r in rows})
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()),
                             "preferences": [[f"Film {10 * u + k}" for k in (1, 3, 2)] for u in users],
                             "status": ["ok"] * len(users), "model": ["m"] * len(users),
                             "prompt_version": ["v"] * len(users)}), run / "preferences.parquet")


def test_benchmark_ladder_values(tmp_path):
    _write_genre_run(tmp_path)
    r = _bench().evaluate(tmp_path, WordEncoder(), others_per_user=2, n_boot=200)
    lad = r["ladder"]
    # a user's own genre ("Action movies") shares a word with its future items only: every pair won
    assert lad["future_genres"]["auc"] == 1.0 and lad["genre_baseline"]["auc"] == 1.0
    # another user's genre: the future items score 0 against 15 negatives, 5 of which (that user's) score
    # above 0 and 10 tie: 10 * 0.5 / 15
    assert lad["genre_baseline"]["auc_other"] == pytest.approx(round(1 / 3, 4))
    # shuffled, another user's (copied) titles: three of the negatives are those very titles and score above
    # the 12 others, which tie with the future items: 12 * 0.5 / 15
    assert lad["shuffled"]["auc"] == 0.4
    assert lad["genre_baseline"]["auc_own_minus_other"]["mean"] == pytest.approx(round(2 / 3, 4))
    # titles share only "film" with every item text: all ties
    assert lad["recent_titles"]["auc"] == 0.5
    # preferences that copy history titles score exactly like recent_titles, not better
    assert r["llm"]["auc"] == lad["recent_titles"]["auc"]
    assert r["llm"]["auc_own_minus_other"] == lad["recent_titles"]["auc_own_minus_other"]
    assert r["llm_beats_shuffled"]["mean"] == r["llm"]["auc_own_minus_other"]["mean"]  # shuffled = other's
    assert r["llm_beats_shuffled"]["mean"] == pytest.approx(0.1)
    assert r["llm_beats_genre_baseline"]["mean"] == pytest.approx(-0.5) and not r["llm_beats_genre_baseline"]["beats"]
    assert r["ladder_in_order"] is False  # future_genres ties genre_baseline here: not strictly in order
    assert r["genre_agreement"] == {"llm": r["llm"]["genre_agreement"], "genre_baseline": 1.0}
    assert r["counts"]["future_items"] == 8 and r["counts"]["users_with_fewer_negatives"] == 4
    assert (r["users"], r["model"], r["negatives_per_user"], r["llm_is_stand_in"]) == (4, "m", 100, False)
    assert set(r["ladder_steps"]) == {"future_genres-recent_titles", "recent_titles-genre_baseline",
                                      "genre_baseline-shuffled"}


def test_benchmark_skips_and_counts_users_without_future_items(tmp_path):
    _write_genre_run(tmp_path, repeat_user=True)
    r = _bench().evaluate(tmp_path, WordEncoder(), others_per_user=2, n_boot=50)
    assert r["users"] == 5
    assert r["counts"]["users_without_future_items"] == 1 and r["counts"]["future_items_repeating_history"] == 1
    assert all(rung["users"] == 4 for rung in r["ladder"].values()) and r["llm"]["users"] == 4


def test_benchmark_legacy_figures_with_parts(tmp_path):
    _write_run(tmp_path, genres=False, parts=True)
    r = _bench().evaluate(tmp_path, OneHotEncoder(), others_per_user=2, n_boot=50)
    assert r["users"] == 3 and r["counts"]["genres"] is None
    assert r["genre_agreement"] == {"llm": None, "genre_baseline": None}
    assert r["llm"]["grounding_accuracy"] == 1.0 and r["llm"]["status"] == {"fallback": 1, "ok": 2}
    assert r["ladder"]["future_genres"]["users"] == 0 and r["ladder_in_order"] is False  # no genres: no ceiling


def test_benchmark_missing_file_is_one_line(tmp_path, capsys):
    _write_run(tmp_path)
    (tmp_path / "preferences.parquet").unlink()
    out = tmp_path / "r.json"
    assert _bench().main(["--run", str(tmp_path), "--json", "--out-json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "preferences.parquet: file not found" in err
    assert not out.exists()


def test_benchmark_writes_json(tmp_path, monkeypatch, capsys):
    _write_run(tmp_path)
    bench = _bench()
    monkeypatch.setattr("lane_ray.text.TextEncoder", lambda *a, **k: OneHotEncoder())
    out = tmp_path / "r.json"
    assert bench.main(["--run", str(tmp_path), "--json", "--out-json", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert json.loads(line) == json.loads(out.read_text())
    assert json.loads(line)["llm"]["grounding_accuracy"] == 1.0


def test_stand_in_writes_canonical_preferences_and_never_overwrites(tmp_path, capsys):
    _write_genre_run(tmp_path)
    (tmp_path / "preferences.parquet").unlink()
    bench = _bench()
    assert bench.main(["--run", str(tmp_path), "--write-stand-in"]) == 0
    t = pq.read_table(tmp_path / "preferences.parquet")
    assert t.column_names == ["user_id", "preferences", "status", "history_sha1", "model", "prompt_version", "raw"]
    assert t["preferences"][0].as_py()[0] == "Action movies" and set(t["model"].to_pylist()) == {bench.STAND_IN_MODEL}
    assert bench.main(["--run", str(tmp_path), "--write-stand-in"]) == 2
    assert "exists" in capsys.readouterr().err
