"""How grounded a user's preferences are, judged with no human in the loop: pure functions on embeddings.

Everything here takes unit-norm float32 embeddings (rows ``[n, d]``, as :class:`lane_ray.text.TextEncoder`
returns them) or plain strings; no model, no file. ``benchmarks/preference_quality.py`` does the reading and
the embedding and documents the protocol; these functions are its definitions:

- :func:`set_score` ``(P, H) = mean over p in P of max over h in H of cos(p, h)``;
- :func:`win_rate`: the fraction of (user, other user) comparisons in which a user's preferences score
  higher against their own held-out items than against the other user's (ties count one half, a missing
  score loses);
- :func:`top_genre` / :func:`closest_label` / :func:`agreement` for ``genre_agreement``;
- :func:`distinctness`: mean pairwise cosine between one user's preferences (lower is more distinct);
- :func:`copies_title_rate`: the share of preferences that restate a history title;
- :func:`genre_baseline`: the trivial baseline (the history's most frequent genres as preferences).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from lane_ray.llm.parsing import _norm, copies_title

# Filler for a baseline whose history has fewer genres and decades than preferences are asked for; the same
# generic phrases the LLM stage's attribute fallback ends with.
GENERIC = ("popular", "well-reviewed", "classic", "recent", "varied", "critically acclaimed")


def split_genres(genres: str | None) -> list[str]:
    """The genres of a catalogue ``genres`` cell ("|"-separated); empty parts and "unknown" dropped."""
    return [g.strip() for g in (genres or "").split("|") if g.strip() and g.strip().lower() != "unknown"]


def set_score(prefs: np.ndarray, items: np.ndarray) -> float:
    """``mean_p max_h cos(p, h)`` for preferences ``prefs`` [m, d] and items ``items`` [h, d] (unit rows);
    NaN when either side is empty."""
    if len(prefs) == 0 or len(items) == 0:
        return float("nan")
    return float((prefs @ items.T).max(axis=1).mean())  # [m, h] -> [m] -> scalar


def draw_others(n_users: int, k: int, seed: int) -> np.ndarray:
    """[n_users, k] row indices of random *other* users (uniform, with replacement, fixed seed): row ``u``
    never contains ``u``."""
    if n_users < 2:
        raise ValueError("grounding needs at least 2 users")
    rng = np.random.default_rng(seed)
    r = rng.integers(0, n_users - 1, size=(n_users, k))  # [U, k] in 0..U-2
    return r + (r >= np.arange(n_users)[:, None])  # skip self: shift indices at or above u up by one


def grounding_scores(prefs: Sequence[np.ndarray], held: Sequence[np.ndarray],
                     others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each user's preferences against their own held-out items, ``own`` [U], and against the
    held-out items of the users in ``others`` [U, k], ``other`` [U, k]."""
    own = np.array([set_score(p, h) for p, h in zip(prefs, held, strict=True)], dtype=np.float64)
    other = np.array([[set_score(prefs[u], held[v]) for v in row] for u, row in enumerate(others)],
                     dtype=np.float64).reshape(others.shape)
    return own, other


def user_win_rates(own: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[U] per user, the fraction of comparisons ``own[u] > other[u, j]`` won: a tie counts 1/2, a NaN on
    either side 0."""
    own = own[:, None]  # [U, 1] against [U, k]
    return ((own > other) + 0.5 * (own == other)).mean(axis=1)


def win_rate(own: np.ndarray, other: np.ndarray) -> float:
    """Fraction of all comparisons won (:func:`user_win_rates` averaged; every user has ``k`` of them)."""
    if other.size == 0:
        return float("nan")
    return float(user_win_rates(own, other).mean())


def standard_error(per_user: np.ndarray) -> float:
    """Standard error of the mean of per-user values (users independent; a user's draws are not)."""
    if per_user.size < 2:
        return float("nan")
    return float(per_user.std(ddof=1) / np.sqrt(per_user.size))


def ranked_genres(genres_seq: Sequence[Sequence[str]]) -> list[str]:
    """Genres of a history (one list per item, oldest first) by frequency; ties go to the genre seen most
    recently."""
    count: Counter[str] = Counter()
    last: dict[str, int] = {}
    for pos, genres in enumerate(genres_seq):
        for g in genres:
            count[g] += 1
            last[g] = pos
    return sorted(count, key=lambda g: (-count[g], -last[g]))


def top_genre(genres_seq: Sequence[Sequence[str]]) -> str | None:
    """The most frequent genre of a history (ties: most recent), or None when it has no genre."""
    ranked = ranked_genres(genres_seq)
    return ranked[0] if ranked else None


def closest_label(prefs: np.ndarray, labels: np.ndarray) -> int:
    """Row of ``labels`` [G, d] with the highest mean cosine to the preferences ``prefs`` [m, d]
    (first on ties); -1 without preferences."""
    if len(prefs) == 0:
        return -1
    return int(np.argmax((prefs @ labels.T).mean(axis=0)))  # [m, G] -> [G]


def agreement(expected: Sequence[str | None], got: Sequence[str | None]) -> float | None:
    """Fraction of users with an ``expected`` value (not None) whose ``got`` equals it; None if no user has one."""
    pairs = [(e, g) for e, g in zip(expected, got, strict=True) if e is not None]
    if not pairs:
        return None
    return sum(e == g for e, g in pairs) / len(pairs)


def distinctness(prefs: Sequence[np.ndarray]) -> float | None:
    """Mean over users (with at least 2 preferences) of the mean pairwise cosine between their preferences;
    None when no user has 2."""
    per_user = []
    for p in prefs:
        m = len(p)
        if m < 2:
            continue
        sim = p @ p.T  # [m, m]
        per_user.append((sim.sum() - np.trace(sim)) / (m * (m - 1)))
    return float(np.mean(per_user)) if per_user else None


def copies_title_rate(prefs: Sequence[Sequence[str]], titles: Sequence[Sequence[str]]) -> float | None:
    """Share of all preferences that copy one of their user's history titles
    (:func:`lane_ray.llm.parsing.copies_title`); None without preferences."""
    total = copied = 0
    for user_prefs, user_titles in zip(prefs, titles, strict=True):
        titles_norm = [_norm(t) for t in user_titles]
        total += len(user_prefs)
        copied += sum(copies_title(p, titles_norm) for p in user_prefs)
    return copied / total if total else None


def genre_baseline(genres_seq: Sequence[Sequence[str]], years: Sequence[str | None], m: int,
                   item_noun: str = "movies") -> tuple[list[str], bool]:
    """The trivial baseline: the ``m`` most frequent genres of a history as ``"<genre> <item_noun>"``
    (ties: most recent); when there are fewer than ``m``, padded with the most frequent decades
    (``"<item_noun> from the 1990s"``) and then generic phrases. Returns the preferences and whether
    padding was needed. Fixed here, independent of the LLM stage, so the baseline does not move when
    the stage changes."""
    prefs = [f"{g} {item_noun}" for g in ranked_genres(genres_seq)[:m]]
    padded = len(prefs) < m
    if padded:
        decades = [[f"{y[:3]}0s"] if y and y[:4].isdigit() else [] for y in years]
        prefs += [f"{item_noun} from the {d}" for d in ranked_genres(decades)]
        prefs += [f"{w} {item_noun}" for w in GENERIC]
    return prefs[:m], padded


__all__ = ["GENERIC", "agreement", "closest_label", "copies_title_rate", "distinctness", "draw_others",
           "genre_baseline", "grounding_scores", "ranked_genres", "set_score", "split_genres", "standard_error",
           "top_genre", "user_win_rates", "win_rate"]
