"""Zero-shot multi-preference extraction with a frozen LLM (LANE step 2), backend injected.

For each user: the train prefix (most recent last, trimmed to a token budget, with genres and year where
the dataset has them) goes into a versioned prompt; decoding is constrained to ``{"preferences": [m
strings]}``; slots that are placeholders, copies of a history title or duplicates are rejected and
re-sampled (up to ``max_retries`` rounds, new seed, higher temperature); what is still missing is filled
from the history's dominant attributes. Every user gets exactly ``m`` preferences and a status:

- ``ok``: the first generation gave ``m`` valid, distinct preferences as well-formed JSON;
- ``repaired``: JSON repair or slot re-sampling was needed, but all ``m`` come from the LLM;
- ``fallback``: at least one preference comes from the attribute fallback.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lane_ray.llm.backend import GenerationParams, JsonStringArray, LLMBackend
from lane_ray.llm.parsing import check_preferences, parse_preferences
from lane_ray.llm.prompts import (
    PREFERENCE_PREFILL,
    PREFERENCE_PROMPT_VERSION,
    HistoryItem,
    preference_messages,
    trim_history,
)


@dataclass
class UserHistory:
    """A user's train prefix, as items the prompt can show."""

    user_id: int
    items: list[HistoryItem]

    def sha1(self, with_attributes: bool) -> str:
        h = hashlib.sha1()
        for it in self.items:
            h.update(json.dumps([it.title, it.genres if with_attributes else None,
                                 it.year if with_attributes else None]).encode())
        return h.hexdigest()


@dataclass
class ExtractionSettings:
    m: int = 5
    budget_tokens: int = 400
    with_attributes: bool = True
    item_noun: str = "movies"
    max_retries: int = 2
    max_slot_tokens: int = 14
    temperature: float = 0.7
    retry_temperature_step: float = 0.2
    seed: int = 0


@dataclass
class UserResult:
    user_id: int
    preferences: list[str]
    status: str
    history_sha1: str
    raw: str
    new_tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def fallback_preferences(items: list[HistoryItem], m: int, have: list[str], item_noun: str = "movies") -> list[str]:
    """Preferences built from the history's dominant genres and decades (most recent items weigh double)."""
    genres: Counter[str] = Counter()
    decades: Counter[str] = Counter()
    n = len(items)
    for k, it in enumerate(items):
        w = 2 if k >= n - max(5, n // 4) else 1
        for g in (it.genres or "").split("|"):
            if g.strip() and g.strip().lower() != "unknown":
                genres[g.strip()] += w
        if it.year and it.year[:4].isdigit():
            decades[f"{it.year[:3]}0s"] += w
    top = [g for g, _ in genres.most_common()]
    cands = [f"{g} {item_noun}" for g in top[:3]]
    cands += [f"{item_noun} from the {d}" for d, _ in decades.most_common(2)]
    recent = Counter(g for it in items[-5:] for g in (it.genres or "").split("|") if g.strip())
    if recent:
        cands.append(f"recently drawn to {recent.most_common(1)[0][0]} {item_noun}")
    if len(top) >= 2:
        cands.append(f"{top[0]} {item_noun} with {top[1]} elements")
    cands += [f"{g} {item_noun}" for g in top[3:6]]
    cands += [f"popular {item_noun}", f"well-reviewed {item_noun}", f"classic {item_noun}",
              f"recent {item_noun}", f"varied {item_noun}", f"critically acclaimed {item_noun}"]
    check = check_preferences(cands, m, [], accepted=have)
    return check.accepted


def _prefill(accepted: list[str]) -> str:
    return PREFERENCE_PREFILL + "".join(json.dumps(a, ensure_ascii=False)[1:-1] + '", "' for a in accepted)


def extract_batch(users: list[UserHistory], backend: LLMBackend, s: ExtractionSettings,
                  count_tokens: Callable[[str], int] | None = None) -> list[UserResult]:
    """Preferences for one batch of users (one generation call per round)."""
    state: dict[int, dict[str, Any]] = {}
    for u in users:
        titles = [it.title for it in u.items]
        lines = trim_history(u.items, s.budget_tokens, s.with_attributes, count_tokens)
        state[u.user_id] = {"user": u, "titles": titles, "messages": preference_messages(lines, s.m, s.item_noun),
                            "accepted": [], "rejected": Counter(), "raw": [], "tokens": 0, "repaired": False}
    pending = [u.user_id for u in users]
    for attempt in range(s.max_retries + 1):
        if not pending:
            break
        # users with the same number of accepted slots share one constrained call
        groups: dict[int, list[int]] = {}
        for uid in pending:
            groups.setdefault(len(state[uid]["accepted"]), []).append(uid)
        for done, uids in groups.items():
            params = GenerationParams(
                max_new_tokens=(s.m - done) * (s.max_slot_tokens + 4) + 4,
                temperature=s.temperature + attempt * s.retry_temperature_step, seed=s.seed + 1000 * attempt,
            )
            for uid in uids:
                if attempt:
                    state[uid]["repaired"] = True
            # prefills differ per user once slots are accepted: generate per distinct prefill
            by_prefill: dict[str, list[int]] = {}
            for uid in uids:
                by_prefill.setdefault(_prefill(state[uid]["accepted"]), []).append(uid)
            for prefill, group in by_prefill.items():
                constraint = JsonStringArray(m=s.m, prefill=prefill, slots_done=done, max_tokens=s.max_slot_tokens)
                gens = backend.generate([state[u]["messages"] for u in group], params, prefill=prefill,
                                        constraint=constraint)
                for uid, g in zip(group, gens, strict=True):
                    st = state[uid]
                    st["raw"].append(prefill + g.text)
                    st["tokens"] += g.new_tokens
                    check, repaired = parse_preferences(prefill + g.text, s.m, st["titles"])
                    # slots accepted earlier are in the prefill; re-check the new ones against them
                    new = check.accepted[len(st["accepted"]):] if check.accepted[: len(st["accepted"])] == \
                        st["accepted"] else check.accepted
                    merged = check_preferences(new, s.m, st["titles"], accepted=st["accepted"])
                    st["accepted"] = merged.accepted
                    st["rejected"].update(check.rejected)
                    st["rejected"].update(merged.rejected)
                    if repaired or check.rejected or merged.rejected:
                        st["repaired"] = True
        pending = [uid for uid in pending if len(state[uid]["accepted"]) < s.m]
    results = []
    for u in users:
        st = state[u.user_id]
        prefs = st["accepted"][: s.m]
        status = "repaired" if st["repaired"] else "ok"
        if len(prefs) < s.m:
            prefs = fallback_preferences(u.items, s.m, prefs, s.item_noun)
            status = "fallback"
        results.append(UserResult(u.user_id, prefs, status, u.sha1(s.with_attributes), "\n---\n".join(st["raw"]),
                                  st["tokens"], dict(st["rejected"])))
    return results


__all__ = ["PREFERENCE_PROMPT_VERSION", "ExtractionSettings", "UserHistory", "UserResult", "extract_batch",
           "fallback_preferences"]
