"""Zero-shot multi-preference extraction with a frozen LLM (LANE step 2), backend injected.

For each user: the train prefix (most recent last, trimmed to a token budget, with genres and year where
the dataset has them) goes into a versioned prompt; decoding is constrained to ``{"preferences": [m
strings]}``, each string opening with one of the dataset's genres or decades when a vocabulary is given
(``ExtractionSettings.vocabulary``: a tiny model stays grounded that way; larger models can go free) and
free words without digits or list punctuation. Slots that are placeholders, copies of a history title or
duplicates are rejected; users with missing slots are re-sampled together in one batched call per round
(up to ``max_retries`` rounds, new seed, higher temperature) and the new valid candidates fill the missing
slots; what is still missing is filled from the history's dominant attributes. Every user gets exactly
``m`` preferences and a status:

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

from lane_ray.llm.backend import Choice, GenerationParams, LLMBackend, json_string_array
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
    """Knobs of :func:`extract_batch` (mirrors ``PreferencesConfig``)."""

    m: int = 5
    budget_tokens: int = 400
    with_attributes: bool = True
    item_noun: str = "movies"
    max_retries: int = 2
    max_slot_tokens: int = 10
    min_slot_tokens: int = 2
    vocabulary: tuple[str, ...] = ()  # each preference opens with one of these (empty: free text)
    temperature: float = 0.3
    retry_temperature_step: float = 0.2
    frequency_penalty: float = 1.0
    seed: int = 0

    @property
    def prompt_version(self) -> str:
        """The version recorded with (and keying the cache of) every result: the prompt text version, whether
        decoding is grounded in a vocabulary, and a hash of every setting that shapes the output (m, the
        vocabulary, token budgets, sampling, retries), so changing any of them recomputes the preferences."""
        settings = json.dumps(sorted(self.__dict__.items()), sort_keys=True, default=list)
        digest = hashlib.sha1(settings.encode()).hexdigest()[:10]
        return f"{PREFERENCE_PROMPT_VERSION}+{'vocab' if self.vocabulary else 'free'}-{digest}"


def attribute_vocabulary(genres: list[str | None], years: list[str | None], min_items: int = 5) -> tuple[str, ...]:
    """The dataset's own vocabulary for grounded slots: genres and release decades with at least
    ``min_items`` items in the catalogue (``genres`` are "|"-separated; "unknown" is skipped)."""
    counts: Counter[str] = Counter()
    for g in genres:
        for x in (g or "").split("|"):
            if x.strip() and x.strip().lower() != "unknown":
                counts[x.strip()] += 1
    for y in years:
        if y and y[:4].isdigit():
            counts[f"{y[:3]}0s"] += 1
    return tuple(sorted(k for k, n in counts.items() if n >= min_items))


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


# Free words of a slot: lower-case letters and spaces only, so a small model writes a phrase, not a list of
# years and genres copied from the history's attribute notes, a capitalised title, or runs of punctuation.
SLOT_CHARS = "abcdefghijklmnopqrstuvwxyz "


def slot_head(vocabulary: tuple[str, ...], item_noun: str) -> tuple[Choice, ...]:
    """The fixed opening of a grounded slot: a vocabulary term not used by an earlier slot (so the m
    preferences are distinct by construction and ordered as the model ranks the terms), then a connector
    such as " movies about"; the free words follow ("Drama movies about" + " family bonds and loss")."""
    if not vocabulary:
        return ()
    connectors = tuple(f" {item_noun} {w}" for w in ("with", "about", "set in", "full of", "that feel"))
    return (Choice(vocabulary, distinct=True), Choice(connectors))


def extract_batch(users: list[UserHistory], backend: LLMBackend, s: ExtractionSettings,
                  count_tokens: Callable[[str], int] | None = None) -> list[UserResult]:
    """Preferences for one batch of users: one batched, constrained generation call per round."""
    state: dict[int, dict[str, Any]] = {}
    for u in users:
        titles = [it.title for it in u.items]
        lines = trim_history(u.items, s.budget_tokens, s.with_attributes, count_tokens)
        messages = preference_messages(lines, s.m, s.item_noun, grounded=bool(s.vocabulary))
        state[u.user_id] = {"user": u, "titles": titles, "messages": messages,
                            "accepted": [], "rejected": Counter(), "raw": [], "tokens": 0, "repaired": False}
    head = slot_head(s.vocabulary, s.item_noun)
    constraint = json_string_array(s.m, 0, s.min_slot_tokens, s.max_slot_tokens, head=head, chars=SLOT_CHARS)
    pending = [u.user_id for u in users]
    for attempt in range(s.max_retries + 1):
        if not pending:
            break
        # room for the whole template (vocabulary term, connector, free words, separators: the processor ends
        # the reply with EOS once it is complete), so a reply is never cut off and then "repaired"
        params = GenerationParams(max_new_tokens=s.m * (s.max_slot_tokens + 16) + 8,
                                  temperature=s.temperature + attempt * s.retry_temperature_step,
                                  seed=s.seed + 1000 * attempt, frequency_penalty=s.frequency_penalty)
        gens = backend.generate([state[uid]["messages"] for uid in pending], params, prefill=PREFERENCE_PREFILL,
                                constraint=constraint)
        for uid, g in zip(pending, gens, strict=True):
            st = state[uid]
            st["raw"].append(PREFERENCE_PREFILL + g.text)
            st["tokens"] += g.new_tokens
            check, repaired = parse_preferences(PREFERENCE_PREFILL + g.text, s.m, st["titles"])
            # a retry's valid candidates fill the slots still missing, checked against those accepted
            merged = check_preferences(check.accepted, s.m, st["titles"], accepted=st["accepted"])
            st["accepted"] = merged.accepted
            st["rejected"].update(check.rejected)
            st["rejected"].update({k: v for k, v in merged.rejected.items() if k != "extra"})
            if attempt or repaired or check.rejected or merged.rejected.get("duplicate"):
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


__all__ = ["PREFERENCE_PROMPT_VERSION", "ExtractionSettings", "UserHistory", "UserResult", "attribute_vocabulary",
           "extract_batch", "fallback_preferences"]
