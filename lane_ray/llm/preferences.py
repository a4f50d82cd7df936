"""Zero-shot multi-preference extraction with a frozen LLM (LANE step 2), backend injected.

For each user: the train prefix (most recent last, trimmed to a token budget, with genres and year where
the dataset has them) goes into a versioned prompt. With a grounding vocabulary (``ExtractionSettings.vocabulary``:
the catalogue's genres, decades and other text-column values with their catalogue shares), every user gets
their **own slot vocabulary** (:func:`user_vocabulary`): the attributes of their own history with support >= 2,
strongest first, listed in the prompt with their counts. Two modes:

- ``generate`` (default): decoding is constrained to ``{"preferences": [m strings]}``, each string opening with
  one of the user's own attributes (distinct across slots), a connector such as " movies about", then free
  words without digits or list punctuation. Slots that are placeholders, copies of a history title or
  duplicates are rejected; users with missing slots are re-sampled together in one batched call per round
  (up to ``max_retries`` rounds, new seed, higher temperature) and the new valid candidates fill the missing
  slots; what is still missing is filled from the history's dominant attributes.
- ``score``: no free generation. Candidate phrases ``"<attribute> <noun> <phrase>"`` (the user's vocabulary
  times :data:`PHRASE_BANK`) are scored by the LLM's log-probability after the prompt
  (:meth:`LLMBackend.score`), calibrated as PMI against the same prompt with an empty history, and picked by
  MMR (token-overlap similarity, one phrase per attribute) for variety: see :func:`score_batch`.

Every user gets exactly ``m`` preferences and a status:

- ``ok``: the first generation gave ``m`` valid, distinct preferences as well-formed JSON (``score``: all ``m``
  chosen from scored candidates);
- ``repaired``: JSON repair or slot re-sampling was needed, but all ``m`` come from the LLM;
- ``fallback``: at least one preference comes from the attribute fallback.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lane_ray.llm.backend import Choice, FreeText, GenerationParams, LLMBackend, Template, Text
from lane_ray.llm.parsing import check_preferences, parse_preferences
from lane_ray.llm.prompts import (
    PREFERENCE_PREFILL,
    PREFERENCE_PROMPT_VERSION,
    HistoryItem,
    preference_messages,
    trim_history,
)

DECADE = re.compile(r"^\d{3}0s$")
VOCABULARY_ORDERS = ("weighted", "lift", "support")
SLOT_ORDERS = ("model", "strength", "share")


@dataclass
class UserHistory:
    """A user's train prefix, as items the prompt can show."""

    user_id: int
    items: list[HistoryItem]

    def sha1(self, with_attributes: bool) -> str:
        h = hashlib.sha1()
        for it in self.items:
            row = [it.title, it.genres if with_attributes else None, it.year if with_attributes else None]
            if with_attributes and it.extra:  # only where the catalogue has other text columns
                row.append(list(it.extra))
            h.update(json.dumps(row).encode())
        return h.hexdigest()


@dataclass
class ExtractionSettings:
    """Knobs of :func:`extract_batch` (mirrors ``PreferencesConfig``). ``vocabulary`` are the catalogue's
    grounding terms and ``vocabulary_share`` (same length) the share of catalogue items carrying each: the
    denominator of a user attribute's lift."""

    m: int = 5
    budget_tokens: int = 400
    with_attributes: bool = True
    item_noun: str = "movies"
    max_retries: int = 2
    max_slot_tokens: int = 4
    min_slot_tokens: int = 2
    vocabulary: tuple[str, ...] = ()  # each preference opens with one of the user's own terms (empty: free text)
    vocabulary_share: tuple[float, ...] = ()
    vocabulary_order: str = "support"
    vocabulary_size: int = 8
    min_support: int = 2
    slot_order: str = "share"
    avoid_categories: bool = True
    distinct_words: bool = True
    mode: str = "generate"
    mmr_lambda: float = 0.7
    temperature: float = 0.3
    retry_temperature_step: float = 0.2
    frequency_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.vocabulary = tuple(self.vocabulary)
        self.vocabulary_share = tuple(float(x) for x in self.vocabulary_share)
        if self.vocabulary_share and len(self.vocabulary_share) != len(self.vocabulary):
            raise ValueError("vocabulary_share needs one share per vocabulary term")
        if self.vocabulary_order not in VOCABULARY_ORDERS:
            raise ValueError(f"vocabulary_order '{self.vocabulary_order}': choose from {', '.join(VOCABULARY_ORDERS)}")
        if self.mode not in ("generate", "score"):
            raise ValueError(f"mode '{self.mode}': choose generate or score")
        if self.slot_order not in SLOT_ORDERS:
            raise ValueError(f"slot_order '{self.slot_order}': choose from {', '.join(SLOT_ORDERS)}")

    @property
    def prompt_version(self) -> str:
        """The version recorded with (and keying the cache of) every result: the prompt text version, whether
        decoding is grounded in a vocabulary (and scored instead of generated), and a hash of every setting
        that shapes the output (m, the vocabulary and its shares, token budgets, sampling, retries), so
        changing any of them recomputes the preferences."""
        settings = json.dumps(sorted(self.__dict__.items()), sort_keys=True, default=list)
        digest = hashlib.sha1(settings.encode()).hexdigest()[:10]
        kind = "vocab" if self.vocabulary else "free"
        if self.mode == "score":
            kind = "score"
        return f"{PREFERENCE_PROMPT_VERSION}+{kind}-{digest}"


def decade(year: str | None) -> str | None:
    """``"1995"`` -> ``"1990s"``; None for a missing or non-numeric year."""
    return f"{year[:3]}0s" if year and year[:4].isdigit() else None


def item_terms(genres: str | None, year: str | None, extra: Sequence[str | None] = ()) -> list[str]:
    """The grounding terms of one item, each once: its genres, its release decade and the values of other
    catalogue text columns (all "|"-separated; empty parts and "unknown" skipped)."""
    out: list[str] = []
    for cell in (genres, *extra):
        for x in (cell or "").split("|"):
            x = x.strip()
            if x and x.lower() != "unknown" and x not in out:
                out.append(x)
    d = decade(year)
    if d and d not in out:
        out.append(d)
    return out


def catalogue_vocabulary(genres: Sequence[str | None], years: Sequence[str | None],
                         extra: Sequence[Sequence[str | None]] = (), min_items: int = 5) -> tuple[tuple[str, ...],
                                                                                                tuple[float, ...]]:
    """The catalogue's grounding terms (genres, decades, other text-column values) with at least ``min_items``
    items, sorted, and the share of catalogue items carrying each. ``genres``/``years`` have one entry per
    item (or are empty); ``extra`` holds one column per other text column, one entry per item."""
    n = max(len(genres), len(years), *(len(c) for c in extra)) if (genres or years or extra) else 0
    counts: Counter[str] = Counter()
    for i in range(n):
        g = genres[i] if i < len(genres) else None
        y = years[i] if i < len(years) else None
        counts.update(item_terms(g, y, [c[i] for c in extra]))
    terms = tuple(sorted(k for k, c in counts.items() if c >= min_items))
    return terms, tuple(counts[t] / n for t in terms)


def attribute_vocabulary(genres: list[str | None], years: list[str | None], min_items: int = 5) -> tuple[str, ...]:
    """The catalogue's genres and release decades with at least ``min_items`` items (see
    :func:`catalogue_vocabulary`, which also gives their shares and takes other text columns)."""
    return catalogue_vocabulary(genres, years, (), min_items)[0]


@dataclass(frozen=True)
class UserAttribute:
    """One term of a user's own slot vocabulary: how many of their items carry it and its lift (the user's
    share of items with it over the catalogue's share)."""

    term: str
    count: int
    lift: float

    @property
    def is_decade(self) -> bool:
        return bool(DECADE.match(self.term))


def _order_key(a: UserAttribute, order: str) -> tuple[float, int, str]:
    if order == "lift":
        primary = a.lift
    elif order == "support":
        primary = float(a.count)
    else:  # weighted: support, scaled up for what the user has more of than the catalogue, down for less
        primary = a.count * math.log2(1.0 + a.lift)
    return (-primary, -a.count, a.term)


def user_vocabulary(items: Sequence[HistoryItem], s: ExtractionSettings) -> list[UserAttribute]:
    """A user's own slot vocabulary, strongest first: the catalogue vocabulary's terms found in their train
    items (each item counts once per term).

    - Eligible: support (items with the term) >= ``s.min_support``. Order (``s.vocabulary_order``):
      ``weighted`` (default) = support x log2(1 + lift), so a user's dominant tastes lead and a term they have
      only because the catalogue is full of it moves down; ``lift`` = lift alone (favours rare terms seen
      twice); ``support`` = counts alone. Categories (genres, other columns: what an item is) come before
      decades (when it is from), and the strongest decade always keeps a place.
    - At most ``s.vocabulary_size`` terms (and never fewer than ``m`` offered when the history has them).
    - Fallback when fewer than ``m`` terms are eligible: terms with support 1 (same order) fill up to ``m``;
      if that is still short the decoder repeats terms, the duplicates are rejected and the history-based
      :func:`fallback_preferences` fills the missing slots (status ``fallback``).
    """
    share = dict(zip(s.vocabulary, s.vocabulary_share, strict=True)) if s.vocabulary_share else \
        dict.fromkeys(s.vocabulary, 1.0)
    counts: Counter[str] = Counter()
    for it in items:
        counts.update(t for t in item_terms(it.genres, it.year, it.extra) if t in share)
    n = max(1, len(items))
    attrs = [UserAttribute(t, c, (c / n) / share[t] if share[t] > 0 else 0.0) for t, c in counts.items()]

    def ordered(xs: list[UserAttribute]) -> list[UserAttribute]:
        xs = sorted(xs, key=lambda a: _order_key(a, s.vocabulary_order))
        return [a for a in xs if not a.is_decade] + [a for a in xs if a.is_decade]

    strong = ordered([a for a in attrs if a.count >= s.min_support])
    size = max(s.vocabulary_size, s.m)
    out = strong[:size]
    decades = [a for a in strong if a.is_decade]
    if decades and not any(a.is_decade for a in out) and len(out) == size:
        out[-1] = decades[0]
    if len(out) < s.m:
        out += ordered([a for a in attrs if a.count < s.min_support])[: s.m - len(out)]
    return out


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
CONNECTORS = ("with", "about", "set in", "full of", "that feel")

# Score mode: the endings a candidate "<attribute> <noun> <phrase>" can take. Fixed and generic on purpose
# (moods, themes, styles that fit most genres), so the scores compare the user's attributes and the mood that
# fits their history, not phrases written for one dataset.
PHRASE_BANK = (
    "with strong characters", "about family and friendship", "full of suspense and twists",
    "with dark humour", "that feel uplifting", "about love and relationships", "full of action and adventure",
    "set in another world", "about crime and justice", "that feel thoughtful and moving",
    "with a light comic touch", "about growing up",
)


def share_slots(vocab: Sequence[UserAttribute], m: int, order: str = "support") -> list[str]:
    """The terms ``m`` slots open with, in proportion to the user's tastes: the slots are shared out among the
    user's categories (genres, other columns; decades only when there is no category) by the D'Hondt rule
    over their strength (the ``order`` key), strongest first, so a user who mostly watches dramas gets
    several drama preferences ("Drama movies about ...", "Drama movies set in ...") and a passing taste gets
    none. Each term's slots come together, the strongest term's first."""
    pool = [a for a in vocab if not a.is_decade] or list(vocab)
    if not pool or m <= 0:
        return []
    weight = {a.term: -_order_key(a, order)[0] for a in pool}
    seats = dict.fromkeys(weight, 0)
    for _ in range(m):
        best = max(pool, key=lambda a: (weight[a.term] / (seats[a.term] + 1), a.count))
        seats[best.term] += 1
    return [a.term for a in pool for _ in range(seats[a.term])]


# Words of a vocabulary term that a slot's free words may still use: too common to name a category.
_COMMON_WORDS = frozenset({"film", "films", "movie", "movies", "the", "and", "for", "with"})

# Words that several preferences of one list may each use (FreeText.repeatable): function words of four
# letters or more, which say nothing about a taste. Every other word of four letters or more is kept to one
# slot: "Drama movies with a focus on family" and "Drama movies focused on love" state one thing twice.
REPEATABLE_WORDS = ("about", "across", "after", "again", "also", "among", "around", "being", "both", "during",
                    "each", "even", "from", "have", "into", "like", "many", "more", "most", "much", "only",
                    "other", "over", "some", "such", "than", "that", "their", "them", "then", "there", "these",
                    "they", "this", "those", "through", "very", "what", "when", "where", "which", "while",
                    "with", "within", "without")


def vocabulary_words(vocabulary: Sequence[str]) -> tuple[str, ...]:
    """The lower-case words (3 letters or more) of the vocabulary's category terms (genres, other text columns;
    not decades), sorted: what a slot's free words must not say. A slot opens with one category; free words
    naming others ("Comedy movies with a twist of horror") blur what the preference states."""
    words = set()
    for term in vocabulary:
        if re.fullmatch(r"\d{3}0s", term):
            continue
        words.update(w for w in re.findall(r"[a-z]+", term.lower()) if len(w) >= 3 and w not in _COMMON_WORDS)
    return tuple(sorted(words))


def slot_template(vocabulary: tuple[str, ...], s: ExtractionSettings,
                  attributes: Sequence[UserAttribute] = ()) -> Template:
    """The constraint of one user's reply (after the prefill): ``m`` grounded slots. ``slot_order="model"``: every
    slot opens with a term of the user's vocabulary not used before, the model's choice (:func:`slot_head`);
    ``"strength"``: slot k opens with the user's k-th strongest term (the vocabulary's order), so the m
    preferences state the m strongest attributes and the model writes what the user enjoys in them. A
    vocabulary shorter than m (:func:`user_vocabulary` pads it with support-1 terms first) leaves slots that
    can only repeat a term: the duplicate is rejected and the history fallback fills it, as in ``"model"``.
    Without a vocabulary the slots are free text. The free words never name a category of the catalogue
    vocabulary (:func:`vocabulary_words`), and with ``distinct_words`` no slot's free words repeat a word stem
    of an earlier slot's (:data:`REPEATABLE_WORDS` aside; both enforced by the transformers backend)."""
    head = slot_head(vocabulary, s.item_noun)
    shared = share_slots(attributes, s.m, s.vocabulary_order) if s.slot_order == "share" else []
    avoid = vocabulary_words(s.vocabulary) if s.avoid_categories else ()
    nouns = tuple(re.findall(r"[a-z]+", s.item_noun.lower()))
    free = FreeText(s.min_slot_tokens, s.max_slot_tokens, SLOT_CHARS, avoid, distinct_words=s.distinct_words,
                    repeatable=tuple(sorted(set(REPEATABLE_WORDS + nouns))))
    segs: list[Any] = []
    for k in range(s.m):
        if s.slot_order == "share" and k < len(shared):
            segs += [Choice((shared[k],)), *head[1:]]
        elif s.slot_order == "strength" and k < len(vocabulary):
            segs += [Choice((vocabulary[k],)), *head[1:]]
        else:
            segs += list(head)
        segs += [free, Text('", "' if k < s.m - 1 else '"]}')]
    return Template(tuple(segs))


def slot_head(vocabulary: tuple[str, ...], item_noun: str) -> tuple[Choice, ...]:
    """The fixed opening of a grounded slot: a vocabulary term not used by an earlier slot (so the m
    preferences are distinct by construction and ordered as the model ranks the terms), then a connector
    such as " movies about"; the free words follow ("Drama movies about" + " family bonds and loss")."""
    if not vocabulary:
        return ()
    connectors = tuple(f" {item_noun} {w}" for w in CONNECTORS)
    return (Choice(vocabulary, distinct=True), Choice(connectors))


def user_prompt(u: UserHistory, s: ExtractionSettings,
                count_tokens: Callable[[str], int] | None = None) -> tuple[list[dict[str, str]], list[UserAttribute]]:
    """The preference prompt of one user and their own slot vocabulary (empty without a catalogue vocabulary:
    free decoding)."""
    vocab = user_vocabulary(u.items, s) if s.vocabulary else []
    lines = trim_history(u.items, s.budget_tokens, s.with_attributes, count_tokens)
    messages = preference_messages(lines, s.m, s.item_noun, grounded=bool(s.vocabulary),
                                   attributes=[(a.term, a.count) for a in vocab])
    return messages, vocab


def extract_batch(users: list[UserHistory], backend: LLMBackend, s: ExtractionSettings,
                  count_tokens: Callable[[str], int] | None = None) -> list[UserResult]:
    """Preferences for one batch of users: one batched, constrained generation call per round (``generate``),
    or one batched scoring call (``score``, :func:`score_batch`). Each user's template offers only their own
    vocabulary (one constraint per conversation)."""
    if s.mode == "score":
        return score_batch(users, backend, s, count_tokens)
    state: dict[int, dict[str, Any]] = {}
    for u in users:
        titles = [it.title for it in u.items]
        messages, vocab = user_prompt(u, s, count_tokens)
        template = slot_template(tuple(a.term for a in vocab), s, vocab)
        state[u.user_id] = {"user": u, "titles": titles, "messages": messages, "template": template,
                            "accepted": [], "rejected": Counter(), "raw": [], "tokens": 0, "repaired": False}
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
                                constraint=[state[uid]["template"] for uid in pending])
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


# ------------------------------------------------------------------------------------------------ score mode


def score_candidates(vocab: Sequence[UserAttribute], item_noun: str,
                     bank: Sequence[str] = PHRASE_BANK) -> list[tuple[str, str, str]]:
    """(attribute term, bank phrase, candidate text) triples: every term of a user's vocabulary with every bank
    phrase, ``"<term> <noun> <phrase>"`` (``"Drama movies about growing up"``)."""
    return [(a.term, p, f"{a.term} {item_noun} {p}") for a in vocab for p in bank]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def token_overlap(a: str, b: str) -> float:
    """Jaccard similarity of two phrases' lower-case word sets (MMR's similarity in score mode: no encoder
    inside an LLM actor)."""
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


def mmr_select(candidates: Sequence[tuple[str, str, str]], scores: Sequence[float], m: int, lam: float = 0.7,
               accept: Callable[[str, list[str]], bool] | None = None) -> list[int]:
    """Indices of ``m`` candidates (term, phrase, text) picked by maximal marginal relevance: each step takes
    the candidate with the highest ``lam * relevance - (1 - lam) * max token_overlap(phrase, picked phrases)``,
    relevance being the score min-max scaled to [0, 1] over the candidates. Hard rules, as in generate mode:
    each attribute term and each bank phrase at most once, and ``accept(text, picked texts)`` (when given)
    must hold (e.g. not a near-duplicate). Ties go to the earlier candidate; fewer than ``m`` when the rules
    leave too few."""
    if not candidates:
        return []
    lo, hi = min(scores), max(scores)
    rel = [(x - lo) / (hi - lo) if hi > lo else 1.0 for x in scores]
    picked: list[int] = []
    used_terms: set[str] = set()
    used_phrases: set[str] = set()
    refused: set[int] = set()
    while len(picked) < m:
        best, best_val = -1, -math.inf
        for i, (term, phrase, _) in enumerate(candidates):
            if term in used_terms or phrase in used_phrases or i in refused:
                continue
            sim = max((token_overlap(phrase, candidates[j][1]) for j in picked), default=0.0)
            val = lam * rel[i] - (1 - lam) * sim
            if val > best_val:
                best, best_val = i, val
        if best < 0:
            break
        if accept is not None and not accept(candidates[best][2], [candidates[j][2] for j in picked]):
            refused.add(best)
            continue
        picked.append(best)
        used_terms.add(candidates[best][0])
        used_phrases.add(candidates[best][1])
    return picked


def neutral_messages(s: ExtractionSettings) -> list[dict[str, str]]:
    """The calibration prompt of score mode: the preference prompt with an empty history and no attributes."""
    return preference_messages([], s.m, s.item_noun, grounded=bool(s.vocabulary))


def score_batch(users: list[UserHistory], backend: LLMBackend, s: ExtractionSettings,
                count_tokens: Callable[[str], int] | None = None) -> list[UserResult]:
    """Score mode for one batch of users. Per user, every candidate of :func:`score_candidates` gets
    ``PMI = log p(candidate | prompt with the user's history) - log p(candidate | neutral prompt)`` (both sums
    over the candidate's tokens, via ``backend.score`` after the preference prefill; the neutral scores are
    computed once per distinct candidate), then :func:`mmr_select` picks ``m`` of them, strongest first.
    Users with fewer than ``m`` vocabulary terms get the rest from :func:`fallback_preferences`. ``raw`` holds
    the picks with their PMI as JSON; ``new_tokens`` is 0 (nothing is generated)."""
    if not s.vocabulary:
        raise ValueError("preferences.mode=score needs a grounding vocabulary (catalogue genres, years or other "
                         "text columns, and grounding=vocabulary)")
    score = getattr(backend, "score", None)
    if score is None:
        raise ValueError(f"preferences.mode=score: the {type(backend).__name__} backend has no score()")
    per_user = []
    convs: list[list[dict[str, str]]] = []
    conts: list[str] = []
    for u in users:
        messages, vocab = user_prompt(u, s, count_tokens)
        cands = score_candidates(vocab, s.item_noun)
        per_user.append((u, cands, len(conts)))
        convs += [messages] * len(cands)
        conts += [text + '"' for _, _, text in cands]  # the closing quote: the phrase ends there
    distinct = sorted(set(conts))
    neutral = neutral_messages(s)
    got = score(convs + [neutral] * len(distinct), conts + distinct, prefill=PREFERENCE_PREFILL)
    given = got[: len(conts)]
    base = dict(zip(distinct, got[len(conts):], strict=True))
    results = []
    for u, cands, start in per_user:
        pmi = [given[start + i] - base[conts[start + i]] for i in range(len(cands))]
        titles = [it.title for it in u.items]

        def valid(text: str, picked: list[str], titles: list[str] = titles) -> bool:
            return len(check_preferences([text], len(picked) + 1, titles, accepted=picked).accepted) > len(picked)

        picks = mmr_select(cands, pmi, s.m, s.mmr_lambda, accept=valid)
        prefs = [cands[i][2] for i in picks]
        status = "ok"
        if len(prefs) < s.m:
            prefs = fallback_preferences(u.items, s.m, prefs, s.item_noun)
            status = "fallback"
        raw = json.dumps({"picks": [{"text": cands[i][2], "pmi": round(pmi[i], 4)} for i in picks],
                          "candidates": len(cands)}, ensure_ascii=False)
        results.append(UserResult(u.user_id, prefs, status, u.sha1(s.with_attributes), raw, 0, {}))
    return results



# catalogue columns that are not grounding attributes (ids, the title itself, the years handled as decades)
_NOT_ATTRIBUTES = {"item_id", "title", "genres", "year", "source_id"}


def attribute_columns(catalog: Any) -> list[str]:
    """The catalogue's other text columns (beyond title, genres and year) whose values ground preferences."""
    import pyarrow as pa

    return [c for c in catalog.column_names
            if c not in _NOT_ATTRIBUTES and pa.types.is_string(catalog.schema.field(c).type)]


def settings_from_config(pc: Any, catalog: Any) -> ExtractionSettings:
    """:class:`ExtractionSettings` from the ``preferences`` config section and the catalogue (a pyarrow table).
    With ``grounding=vocabulary`` the grounding vocabulary is the catalogue's genres, decades and other
    text-column values with at least 5 items, with their catalogue shares (none where the catalogue has no
    attributes: free decoding). Each user's slots are then offered their own attributes (:func:`user_vocabulary`)."""
    vocab: tuple[str, ...] = ()
    shares: tuple[float, ...] = ()
    if pc.grounding == "vocabulary" and pc.with_attributes:
        cols = catalog.column_names
        vocab, shares = catalogue_vocabulary(catalog["genres"].to_pylist() if "genres" in cols else [],
                                             catalog["year"].to_pylist() if "year" in cols else [],
                                             [catalog[c].to_pylist() for c in attribute_columns(catalog)])
    return ExtractionSettings(m=pc.m, budget_tokens=pc.budget_tokens, with_attributes=pc.with_attributes,
                              item_noun=pc.item_noun, max_retries=pc.max_retries, max_slot_tokens=pc.max_slot_tokens,
                              min_slot_tokens=pc.min_slot_tokens, vocabulary=vocab, vocabulary_share=shares,
                              vocabulary_order=pc.vocabulary_order, vocabulary_size=pc.vocabulary_size,
                              min_support=pc.min_support, slot_order=pc.slot_order,
                              avoid_categories=pc.avoid_categories, distinct_words=pc.distinct_words,
                              mode=pc.mode,
                              mmr_lambda=pc.mmr_lambda,
                              temperature=pc.temperature, seed=pc.seed, frequency_penalty=pc.frequency_penalty)


__all__ = ["CONNECTORS", "ExtractionSettings", "PHRASE_BANK", "PREFERENCE_PROMPT_VERSION", "REPEATABLE_WORDS",
           "UserAttribute", "UserHistory", "UserResult", "VOCABULARY_ORDERS", "attribute_columns",
           "attribute_vocabulary", "catalogue_vocabulary", "extract_batch", "fallback_preferences", "item_terms",
           "mmr_select", "score_batch", "score_candidates", "settings_from_config", "token_overlap",
           "user_vocabulary"]
