"""Preference-quality metrics (lane_ray.llm.quality) against values computed by hand, and the benchmark's
reading and reporting with a stand-in encoder (no model)."""

from __future__ import annotations

import importlib.util
import json
import math
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


# --- the benchmark, end to end with a stand-in encoder ---------------------------------------------------

class OneHotEncoder:
    """Every distinct text its own axis: cosine 1 for equal texts, 0 otherwise."""

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.eye(len(texts), dtype=np.float32)


def _bench():
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


def test_benchmark_values_with_genres(tmp_path):
    _write_run(tmp_path)
    r = _bench().evaluate(tmp_path, OneHotEncoder(), others_per_user=4, seed=1)
    assert (r["users"], r["model"], r["prompt_version"]) == (3, "m", "v")
    llm, base = r["llm"], r["genre_baseline"]
    # own score (1 + 0) / 2 = 0.5 against another user's 0: every comparison won
    assert llm["grounding_accuracy"] == 1.0 and llm["grounding_accuracy_single"] == 1.0
    assert llm["status"] == {"fallback": 1, "ok": 2}
    assert llm["distinctness"] == 0.0 and llm["copies_title_rate"] == 0.0
    # titles match no genre label: argmax falls on the first label (Action), right for user 1 only
    assert llm["genre_agreement"] == pytest.approx(round(1 / 3, 4))
    # genre phrases never equal a title: every comparison a tie
    assert base["grounding_accuracy"] == 0.5
    assert base["genre_agreement"] == 1.0 and base["status"] == {"padded": 3}
    assert r["beats_baseline"] is True and r["genres"] == 4  # Action, Comedy, Drama, Western


def test_benchmark_without_genres_and_with_parts(tmp_path):
    _write_run(tmp_path, genres=False, parts=True)
    r = _bench().evaluate(tmp_path, OneHotEncoder(), others_per_user=2)
    assert r["users"] == 3 and r["genres"] is None
    assert r["llm"]["genre_agreement"] is None and r["genre_baseline"]["genre_agreement"] is None
    assert r["llm"]["grounding_accuracy"] == 1.0


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
