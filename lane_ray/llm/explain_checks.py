"""Checks that an explanation follows the recommender's attribution, each with its chance level.

They read only the LLM's free text (the "because" clause and the reason's body, never the fixed title or
preference the grammar wrote) and compare it with the attribution the prompt stated. Per row (``None`` where
a check does not apply: template rows, rows that cite history items, a single preference):

- ``cites_main``: the free text is closest (sentence-encoder cosine) to the main preference among the ``m``.
  Chance ``1/m`` (a text unrelated to the label is closest to each preference alike).
- ``follows_attribution`` (the key check): the row regenerated with the main label moved to another
  preference (:func:`lane_ray.llm.explain.counterfactual`): its free text is closest to the new main
  preference, and that differs from the original's closest one (the text moved with the label). Chance
  ``(1/m) * (1 - 1/m)`` for a text that ignores the label.
- ``evidence_valid``: every cited history item is in the user's training history and has a positive
  ``history_contrib``. Chance: the share of the offered options that are valid (one uniform pick).
- ``unsupported_claims``: genre or decade words of the free text that belong neither to the target nor to the
  cited preference (citing history: the cited items) over all such words; lower is better. Chance: the share
  of the catalogue's genre vocabulary that is unsupported for the row (a genre word picked at random).
- judge mode: ``fit_spearman`` = Spearman(LLM fit, ``pref_contrib``), 0 for constant fits (chance 0), and,
  over the batch, ``likelihood_auc`` of rank-1 rows against negative controls (chance 0.5).
- ``not_copied`` (secondary): at least ``not_copied_threshold`` of the free sentences appear in no other
  user's explanation.

``format_ok`` is kept as a count: the grammar makes the structure hold by construction.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lane_ray.llm.explain import LIKELIHOODS, SOURCES

RATES = ("cites_main", "follows_attribution", "evidence_valid", "unsupported_claims", "not_copied")
JUDGE_RATES = ("fit_spearman", "likelihood_auc")
ROW_CHECKS = ("format_ok", "cites_main", "follows_attribution", "evidence_valid", "claims", "unsupported",
              "not_copied", "unique_ratio", "fit_spearman", "closest_preference", "cf_closest_preference")

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
# "1990s", "1990's", "90s", "'90s", "nineties" is not matched (the grammar keeps digits out of the clause)
_DECADE = re.compile(r"(?<![\w'])'?(?:(1[89]|20)(\d)0|(\d)0)'?s\b")


def free_text(row: Mapping[str, Any]) -> str:
    """The LLM's own words of a row: the "because" clause and the reason's body."""
    return " ".join(x for x in (row.get("because") or "", row.get("reason_free") or "") if x).strip()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def genre_forms(genre: str) -> set[str]:
    """Word forms that name ``genre``: itself and its plural ("comedy", "comedies"; "thriller", "thrillers")."""
    g = genre.strip().lower()
    if not g:
        return set()
    forms = {g, g + "s"}
    if g.endswith("y"):
        forms.add(g[:-1] + "ies")
    return forms


def decade_of(year: Any) -> int | None:
    try:
        y = int(str(year)[:4])
    except (TypeError, ValueError):
        return None
    return y // 10 * 10


def decades_in(text: str) -> list[int]:
    """Decades written in ``text`` ("1990s" -> 1990, "'80s" -> 1980, "00s" -> 2000)."""
    out = []
    for m in _DECADE.finditer(text):
        if m.group(1):
            out.append(int(m.group(1) + m.group(2) + "0"))
        else:
            d = int(m.group(3))
            out.append(2000 + 10 * d if d <= 2 else 1900 + 10 * d)
    return out


class Vocabulary:
    """The catalogue's genre words (from its ``genres`` column, "|"-separated) and each item's attributes."""

    def __init__(self, items: Mapping[int, tuple[str | None, Any]]) -> None:
        self.items = {int(i): (g or "", y) for i, (g, y) in items.items()}
        self.genres = sorted({g.strip().lower() for g, _ in self.items.values() for g in g.split("|") if g.strip()})
        self.form_of = {f: g for g in self.genres for f in genre_forms(g)}

    def item_attributes(self, item_id: int) -> tuple[set[str], set[int]]:
        g, y = self.items.get(int(item_id), ("", None))
        d = decade_of(y)
        return {x.strip().lower() for x in g.split("|") if x.strip()}, ({d} if d is not None else set())

    def claims(self, text: str) -> tuple[list[str], list[int]]:
        """Genres (canonical names) and decades named in ``text``."""
        words = _words(text)
        return [self.form_of[w] for w in words if w in self.form_of], decades_in(text)


def _supported(row: Mapping[str, Any], vocab: Vocabulary) -> tuple[set[str], set[int]]:
    genres, decades = vocab.item_attributes(row["item_id"])
    if row.get("cites_history"):
        # the cited items: the one the reason names (the main evidence item, first of the valid options) and
        # the picked evidence
        for i in [*(row.get("valid_item_ids") or [])[:1], *(row.get("evidence_item_ids") or [])]:
            g, d = vocab.item_attributes(i)
            genres |= g
            decades |= d
    else:
        g, d = vocab.claims(row.get("main_preference") or "")
        genres |= set(g)
        decades |= set(d)
    return genres, decades


def unsupported_claims(row: Mapping[str, Any], vocab: Vocabulary) -> tuple[int, int, float]:
    """(claims, unsupported, chance) of one row's free text; chance = share of the genre vocabulary that would
    be unsupported here."""
    genres, decades = vocab.claims(free_text(row))
    ok_g, ok_d = _supported(row, vocab)
    bad = sum(1 for g in genres if g not in ok_g) + sum(1 for d in decades if d not in ok_d)
    chance = 1.0 - len(ok_g & set(vocab.genres)) / len(vocab.genres) if vocab.genres else 0.0
    return len(genres) + len(decades), bad, chance


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=float)
        for val in np.unique(v):  # ties share their average rank
            idx = v == val
            r[idx] = r[idx].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """P(a positive scores above a negative) + half the ties; None without both."""
    if not len(pos) or not len(neg):
        return None
    p, n = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def closest_preferences(rows: Sequence[Mapping[str, Any]], encode: Callable[[list[str]], np.ndarray]
                        ) -> list[int | None]:
    """Per row, the index of the preference whose embedding is closest (cosine) to the row's free text; None for
    template rows, rows without free text or without preferences. One encoder call for the whole batch."""
    texts: dict[str, int] = {}
    need = []
    for r in rows:
        ft = free_text(r)
        if r["source"] != "llm" or not ft or not r.get("preferences"):
            need.append(None)
            continue
        for t in [ft, *r["preferences"]]:
            texts.setdefault(t, len(texts))
        need.append(ft)
    if not texts:
        return [None] * len(rows)
    vecs = np.asarray(encode(list(texts)), dtype=np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    out: list[int | None] = []
    for r, ft in zip(rows, need, strict=True):
        if ft is None:
            out.append(None)
            continue
        sims = vecs[[texts[p] for p in r["preferences"]]] @ vecs[texts[ft]]
        out.append(int(np.argmax(sims)))
    return out


def _sentences(row: Mapping[str, Any]) -> list[str]:
    out = []
    for unit in (row.get("because") or "", row.get("reason_free") or ""):
        for sent in _SENTENCE_END.split(unit):
            w = _words(sent)
            if len(w) >= 3:
                out.append(" ".join(w))
    return out


def compute_checks(rows: list[dict[str, Any]], not_copied_threshold: float = 0.5,
                   encode: Callable[[list[str]], np.ndarray] | None = None, vocab: Vocabulary | None = None,
                   counterfactuals: Mapping[tuple[int, int], Mapping[str, Any]] | None = None
                   ) -> list[dict[str, Any]]:
    """Per-row checks (keys :data:`ROW_CHECKS`) of ``rows`` (:meth:`Explanation.to_row` dicts or rows of
    ``explanations.parquet``). ``encode`` (a sentence encoder's ``encode``) enables the embedding checks,
    ``vocab`` the claims count, ``counterfactuals`` (``(user_id, item_id)`` -> the regenerated row)
    ``follows_attribution``; without them those checks are None."""
    closest = closest_preferences(rows, encode) if encode is not None else [None] * len(rows)
    cf_rows = [counterfactuals.get((int(r["user_id"]), int(r["item_id"]))) if counterfactuals else None
               for r in rows]
    cf_closest: list[int | None] = [None] * len(rows)
    if encode is not None and any(c is not None for c in cf_rows):
        have = [k for k, c in enumerate(cf_rows) if c is not None]
        for k, v in zip(have, closest_preferences([cf_rows[k] for k in have], encode), strict=True):
            cf_closest[k] = v
    users_of: dict[str, set[int]] = defaultdict(set)
    sentences: dict[int, list[str]] = {}
    for k, r in enumerate(rows):
        if r["source"] == "llm":
            sentences[k] = _sentences(r)
            for sent in sentences[k]:
                users_of[sent].add(int(r["user_id"]))
    out = []
    for k, r in enumerate(rows):
        c: dict[str, Any] = dict.fromkeys(ROW_CHECKS)
        c["format_ok"] = bool(r["format_ok"])
        out.append(c)
        if r["source"] != "llm":
            continue
        uid = int(r["user_id"])
        c["closest_preference"] = closest[k]
        prefers = not r["cites_history"] and len(r["preferences"]) > 1
        if prefers and closest[k] is not None:
            c["cites_main"] = closest[k] == r["main_index"]
        cf = cf_rows[k]
        if prefers and cf is not None and cf["source"] == "llm" and cf_closest[k] is not None \
                and closest[k] is not None:
            c["cf_closest_preference"] = cf_closest[k]
            c["follows_attribution"] = cf_closest[k] == cf["main_index"] and cf_closest[k] != closest[k]
        valid = set(r["valid_item_ids"] or [])
        cited = list(r["evidence_item_ids"] or [])
        c["evidence_valid"] = bool(cited) and all(i in valid for i in cited)
        if vocab is not None:
            c["claims"], c["unsupported"], _ = unsupported_claims(r, vocab)
        sents = sentences[k]
        unique = sum(1 for s in sents if users_of[s] == {uid}) / len(sents) if sents else 0.0
        c["not_copied"] = unique >= not_copied_threshold
        c["unique_ratio"] = round(unique, 4)
        if r.get("mode") == "judge" and r.get("fit"):
            c["fit_spearman"] = round(spearman(r["fit"], r["pref_contrib"]), 4)
    return out


def _mean(xs: list[float]) -> float | None:
    return round(float(np.mean(xs)), 4) if xs else None


def check_rates(rows: list[dict[str, Any]], checks: list[dict[str, Any]], not_copied_threshold: float = 0.5,
                vocab: Vocabulary | None = None, controls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The batch summary written to ``explanation_checks.json``: per check its ``rates`` (over the rows where
    it applies), ``chance`` level, ``passed`` and ``measured`` counts; ``format_ok`` as a count; sources,
    likelihoods and how many rows cite history items. In judge mode also ``fit_spearman`` (mean over rows)
    and ``likelihood_auc`` (rank-1 rows against ``controls``, the explained negative controls)."""
    n = len(rows)
    llm = [k for k, r in enumerate(rows) if r["source"] == "llm"]
    summary: dict[str, Any] = {
        "rows": n, "users": len({int(r["user_id"]) for r in rows}),
        "mode": rows[0].get("mode", "grounded") if rows else "grounded",
        "not_copied_threshold": not_copied_threshold,
        "source": {s: sum(1 for r in rows if r["source"] == s) for s in SOURCES},
        "format_ok": sum(1 for c in checks if c["format_ok"]),
        "likelihood": {v: sum(1 for r in rows if r["likelihood"] == v) for v in LIKELIHOODS},
        "likelihood_source": sorted({r.get("likelihood_source", "rank") for r in rows}),
        "cites_history": sum(1 for r in rows if r.get("cites_history")),
        "rates": {}, "chance": {}, "passed": {}, "measured": {},
    }
    if "rank" in summary["likelihood_source"]:
        summary["likelihood_note"] = ("no hit_rate column in the candidates: likelihood buckets come from the rank "
                                      "(explain.template_high_rank / template_medium_rank), not from validation")
    chance: dict[str, list[float]] = defaultdict(list)
    for k in llm:
        r, c = rows[k], checks[k]
        m = len(r["preferences"])
        if c["cites_main"] is not None:
            chance["cites_main"].append(1.0 / m)
        if c["follows_attribution"] is not None:
            chance["follows_attribution"].append((1.0 / m) * (1.0 - 1.0 / m))
        if c["evidence_valid"] is not None:
            offered = r["offered_item_ids"] or []
            chance["evidence_valid"].append(len(set(r["valid_item_ids"] or [])) / len(offered) if offered else 0.0)
        if vocab is not None and c["claims"]:
            chance["unsupported_claims"].append(unsupported_claims(r, vocab)[2])
    for name in ("cites_main", "follows_attribution", "evidence_valid", "not_copied"):
        vals = [c[name] for c in checks if c[name] is not None]
        summary["passed"][name] = sum(1 for v in vals if v)
        summary["measured"][name] = len(vals)
        summary["rates"][name] = round(summary["passed"][name] / len(vals), 4) if vals else None
    claims = sum(c["claims"] or 0 for c in checks)
    bad = sum(c["unsupported"] or 0 for c in checks)
    summary["passed"]["unsupported_claims"] = bad  # "passed" here counts the unsupported words (lower is better)
    summary["measured"]["unsupported_claims"] = claims
    summary["rates"]["unsupported_claims"] = round(bad / claims, 4) if claims else (0.0 if vocab else None)
    for name in ("cites_main", "follows_attribution", "evidence_valid", "unsupported_claims"):
        summary["chance"][name] = _mean(chance[name])
    summary["chance"]["not_copied"] = None
    if summary["mode"] == "judge":
        sp = [c["fit_spearman"] for c in checks if c["fit_spearman"] is not None]
        summary["rates"]["fit_spearman"] = _mean(sp)
        summary["measured"]["fit_spearman"] = len(sp)
        summary["passed"]["fit_spearman"] = sum(1 for v in sp if v > 0)
        summary["chance"]["fit_spearman"] = 0.0
        summary["fit_all_equal"] = sum(1 for k in llm if len(set(rows[k]["fit"] or [])) <= 1)
        level = {v: j for j, v in enumerate(LIKELIHOODS)}
        top = [level[r["likelihood"]] for r in rows if r["source"] == "llm" and int(r["rank"]) == 1]
        neg = [level[r["likelihood"]] for r in controls or [] if r["source"] == "llm"]
        summary["rates"]["likelihood_auc"] = None if auc(top, neg) is None else round(auc(top, neg), 4)
        summary["measured"]["likelihood_auc"] = {"top": len(top), "controls": len(neg)}
        summary["passed"]["likelihood_auc"] = None
        summary["chance"]["likelihood_auc"] = 0.5
    summary["first_try_llm"] = sum(1 for k in llm if rows[k].get("attempts") == 1)
    return summary



def format_check_rates(m: dict[str, Any]) -> str:
    """``name rate (chance c)`` for every check rate of an ``explanation_checks.json`` summary."""
    parts = []
    for k, v in m["rates"].items():
        if v is None:
            continue
        c = m.get("chance", {}).get(k)
        parts.append(f"{k} {v:.2f}" + (f" (chance {c:.2f})" if c is not None else ""))
    return ", ".join(parts)


__all__ = ["JUDGE_RATES", "RATES", "ROW_CHECKS", "Vocabulary", "auc", "check_rates", "closest_preferences",
           "compute_checks", "decades_in", "format_check_rates", "free_text", "genre_forms", "spearman",
           "unsupported_claims"]
