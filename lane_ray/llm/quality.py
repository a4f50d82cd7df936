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
- :func:`near_twin_rate`: share of users with two preferences at cosine >= 0.8 (near-twins);
- :func:`copies_title_rate`: the share of preferences that restate a history title;
- :func:`genre_baseline`: the trivial baseline (the history's most frequent genres as preferences).

The headline metric, **future-item AUC**, can tell good preferences from bad (the win rate above cannot: it
sits at chance even for the user's own recent titles):

- :func:`item_text` renders a catalogue item as ``"title (genres; year)"``; :func:`item_scores` scores items
  for a user as ``max over the user's preferences p of cos(p, item text)``;
- :func:`popularity_negatives` draws per user items they never interacted with, in proportion to their
  interaction counts; :func:`auc` / :func:`user_aucs` give per user the AUC of their future items (validation
  and test) against those negatives, ties counting one half;
- :func:`rung` summarises one set of preferences: mean AUC with its own preferences, with another user's
  (:func:`other_users`), and the per-user difference own - other, each with a :func:`bootstrap_ci` over users;
- :func:`ladder_in_order` is the validity check: the same code run on preference sets of known quality
  (:data:`LADDER`) must order them, with the uninformative one at chance, or the metric does not count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lane_ray.llm.parsing import copies_title, normalise_text

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


NEAR_TWIN_COSINE = 0.8  # MiniLM cosine above which two short preference phrases read as one


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


def near_twin_rate(prefs: Sequence[np.ndarray], threshold: float = NEAR_TWIN_COSINE) -> float | None:
    """Share of users (with at least 2 preferences) whose two closest preferences have a cosine of ``threshold``
    or more: two preferences an explanation can hardly tell apart, whether two word forms ("a focus on" /
    "focused on") or two slots opening alike ("Drama movies with ..."). None when no user has 2."""
    flags = []
    for p in prefs:
        if len(p) < 2:
            continue
        sim = p @ p.T
        np.fill_diagonal(sim, -np.inf)
        flags.append(float(sim.max()) >= threshold)
    return float(np.mean(flags)) if flags else None


def copies_title_rate(prefs: Sequence[Sequence[str]], titles: Sequence[Sequence[str]]) -> float | None:
    """Share of all preferences that copy one of their user's history titles
    (:func:`lane_ray.llm.parsing.copies_title`); None without preferences."""
    total = copied = 0
    for user_prefs, user_titles in zip(prefs, titles, strict=True):
        titles_norm = [normalise_text(t) for t in user_titles]
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


# --- future-item AUC: the preference-quality metric that can fail --------------------------------------------

# The validity ladder, best first: preference sets whose order is known, run through the same code as the
# LLM's. ``future_genres`` knows the answer (the ceiling a preference can reach), ``recent_titles`` and
# ``genre_baseline`` are honest history summaries (specific, then coarse), ``shuffled`` is another user's
# LLM preferences (no information about this user: chance).
LADDER = ("future_genres", "recent_titles", "genre_baseline", "shuffled")


def item_text(title: str, genres: Sequence[str] = (), year: str | None = None) -> str:
    """``"title (genre, genre; year)"``, the text an item is scored by; parts that are missing are left out
    (``"title (year)"``, ``"title (genres)"``, ``"title"``). A title that already ends with ``"(year)"`` drops
    it, so the year is not said twice."""
    title = title.strip()
    year = (year or "").strip() or None
    if year and title.endswith(f"({year})"):
        title = title[: -len(f"({year})")].rstrip()
    inner = "; ".join(part for part in (", ".join(genres), year) if part)
    return f"{title} ({inner})" if inner else title


def genre_phrases(genres_seq: Sequence[Sequence[str]], item_noun: str = "movies") -> list[str]:
    """The distinct genres of some items (one list per item) as ``"<genre> <item_noun>"``, the phrase form of
    :func:`genre_baseline`, most frequent first (ties: most recent)."""
    return [f"{g} {item_noun}" for g in ranked_genres(genres_seq)]


def item_scores(prefs: np.ndarray, items: np.ndarray) -> np.ndarray:
    """[n] float64: each item's best cosine to any preference, for preferences ``prefs`` [m, d] and item texts
    ``items`` [n, d] (unit rows). With no preference every score is NaN."""
    if len(prefs) == 0:
        return np.full(len(items), np.nan)
    return (prefs @ items.T).max(axis=0).astype(np.float64)  # [m, n] -> [n]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative) over all (positive, negative) pairs, a tie counting one half;
    NaN when either side is empty or a score is NaN."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.size == 0 or neg.size == 0 or np.isnan(pos).any() or np.isnan(neg).any():
        return float("nan")
    diff = pos[:, None] - neg[None, :]  # [p, n]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def popularity_negatives(popularity: np.ndarray, seen: Sequence[np.ndarray], n: int, seed: int) -> list[np.ndarray]:
    """Per user, ``n`` distinct item rows drawn without replacement with probability proportional to
    ``popularity`` [N] (interaction counts), never one of the user's ``seen`` rows and never an item of zero
    popularity; fewer than ``n`` when fewer are eligible. Fixed ``seed``: one generator, users in order.

    Sampling by exponential keys (``E / w``, the ``n`` smallest) is successive sampling proportional to ``w``:
    the first pick is item ``i`` with probability ``w_i / sum w`` over the eligible items."""
    w = np.asarray(popularity, np.float64)
    rng = np.random.default_rng(seed)
    out = []
    for rows in seen:
        keys = rng.exponential(size=w.size) / np.where(w > 0, w, np.nan)  # [N]; NaN: never drawn
        keys[np.asarray(rows, np.int64)] = np.nan
        eligible = np.flatnonzero(~np.isnan(keys))
        k = min(n, eligible.size)
        pick = eligible[np.argpartition(keys[eligible], k - 1)[:k]] if k else eligible[:0]
        out.append(np.sort(pick))
    return out


def user_aucs(prefs: Sequence[np.ndarray], items: np.ndarray, future: Sequence[np.ndarray],
              negatives: Sequence[np.ndarray]) -> np.ndarray:
    """[U] float64: per user ``u``, :func:`auc` of the scores (:func:`item_scores` with ``prefs[u]`` [m_u, d])
    of the future item rows ``future[u]`` against the negative rows ``negatives[u]``, rows of the item text
    embeddings ``items`` [N, d]. NaN for a user with no preference, no future item or no negative."""
    out = np.full(len(prefs), np.nan)
    for u, (p, f, ng) in enumerate(zip(prefs, future, negatives, strict=True)):
        if len(p) and len(f) and len(ng):
            s = item_scores(p, items[np.concatenate([f, ng]).astype(np.int64)])
            out[u] = auc(s[: len(f)], s[len(f):])
    return out


def other_users(n_users: int, seed: int) -> np.ndarray:
    """[U] one fixed random other user per user (uniform, never itself; :func:`draw_others` with one draw)."""
    return draw_others(n_users, 1, seed)[:, 0]


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` of per-user ``values`` (NaNs left out): the mean and the percentile bootstrap
    interval at ``level`` from ``n_boot`` resamples of the users with replacement (fixed ``seed``). All NaN
    when no value is left; a single value gives a zero-width interval."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))  # [B, U]
    means = v[idx].mean(axis=1)  # [B]
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(v.mean()), float(low), float(high)


def _r(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 4)


def summary(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float | int | None]:
    """``{"mean", "ci_low", "ci_high", "users"}`` of per-user values (:func:`bootstrap_ci`, 95 %), rounded to
    4 places, None where undefined; ``users`` counts the finite values."""
    mean, low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": _r(mean), "ci_low": _r(low), "ci_high": _r(high), "users": int((~np.isnan(values)).sum())}


def rung(prefs: Sequence[np.ndarray], items: np.ndarray, future: Sequence[np.ndarray],
         negatives: Sequence[np.ndarray], others: np.ndarray, n_boot: int = 1000,
         seed: int = 0) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One preference set's figures: per user ``u`` the AUC with its own preferences ``prefs[u]`` and with
    user ``others[u]``'s, on the same future items and negatives. Returns the summary
    ``{"auc", "auc_ci_low", "auc_ci_high", "auc_other", "auc_own_minus_other": summary, "users"}`` and the
    per-user own and other AUCs [U] (NaN where undefined). The difference is taken per user, over the users
    where both are defined, so what every user's future items share with the popularity of the negatives
    (a property of the data, not of the preferences) cancels."""
    own = user_aucs(prefs, items, future, negatives)
    other = user_aucs([prefs[int(v)] for v in others], items, future, negatives)
    s_own = summary(own, n_boot, seed)
    s_other = summary(other, n_boot, seed)
    return ({"auc": s_own["mean"], "auc_ci_low": s_own["ci_low"], "auc_ci_high": s_own["ci_high"],
             "auc_other": s_other["mean"], "auc_own_minus_other": summary(own - other, n_boot, seed),
             "users": s_own["users"]}, own, other)


def ladder_in_order(ladder: Mapping[str, Mapping[str, Any]], figure: str = "auc_own_minus_other") -> bool:
    """The validity check on the rungs of :data:`LADDER` (each a :func:`rung` summary). True when every rung
    has the figure, its means fall strictly along the ladder (``future_genres > recent_titles >
    genre_baseline > shuffled``), and ``shuffled`` is at chance: its 95 % bootstrap interval contains the
    chance level. ``figure="auc_own_minus_other"`` (the headline, chance 0) or ``"auc"`` (chance 0.5: the raw
    AUC, which also carries what every user's future items share against the negatives). Only when the
    ladder is in order does the metric count."""
    try:
        if figure == "auc":
            stats = [(ladder[n]["auc"], ladder[n]["auc_ci_low"], ladder[n]["auc_ci_high"]) for n in LADDER]
            chance = 0.5
        else:
            stats = [(ladder[n][figure]["mean"], ladder[n][figure]["ci_low"], ladder[n][figure]["ci_high"])
                     for n in LADDER]
            chance = 0.0
    except KeyError:
        return False
    if any(v is None for st in stats for v in st):
        return False
    means = [m for m, _, _ in stats]
    _, low, high = stats[-1]
    return all(a > b for a, b in zip(means[:-1], means[1:], strict=True)) and low <= chance <= high


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-user ``a - b`` [U] over the users where both are defined: :func:`summary` plus ``"ci_excludes_zero"``
    and ``"beats"`` (the interval lies above 0)."""
    s = summary(np.asarray(a, np.float64) - np.asarray(b, np.float64), n_boot, seed)
    low, high = s["ci_low"], s["ci_high"]
    excl = low is not None and high is not None and (low > 0 or high < 0)
    return {**s, "ci_excludes_zero": bool(excl), "beats": bool(low is not None and low > 0)}


__all__ = ["GENERIC", "LADDER", "NEAR_TWIN_COSINE", "agreement", "auc", "bootstrap_ci", "closest_label",
           "copies_title_rate", "distinctness", "draw_others", "genre_baseline", "genre_phrases", "grounding_scores",
           "item_scores", "item_text", "ladder_in_order", "near_twin_rate", "other_users", "paired_difference",
           "popularity_negatives", "ranked_genres", "rung", "set_score", "split_genres", "standard_error", "summary",
           "top_genre", "user_aucs", "user_win_rates", "win_rate"]
