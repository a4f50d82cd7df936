"""Robust parsing of LLM output: extract a JSON value, repair common breakage, validate preferences."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lane_ray.llm.backend import JsonStringState
from lane_ray.llm.prompts import clean_text

_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_PLACEHOLDER = re.compile(
    r"^(?:(?:movie|film|item|preference|product|game|title|example)\s*#?\s*\d*|\.{2,}|…|n/?a|none|null|tbd|\?+)$",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z0-9']+")
# Words a phrase cut off by a token cap may end on ("... such as the"): trimmed from the end of a slot.
_DANGLING = re.compile(
    r"(?:\s+(?:a|an|and|are|as|at|by|for|from|in|into|is|it|its|of|on|or|such|that|the|their|to|was|were|which|"
    r"who|with))+\s*$", re.IGNORECASE)


def _structural(text: str, start: int = 0, state: dict[str, bool] | None = None) -> Iterator[tuple[int, str]]:
    """(index, char) of the characters outside JSON strings (quotes excluded), escapes honoured. When given,
    ``state["open_string"]`` tells afterwards whether the text ends inside a string."""
    scan = JsonStringState()
    for i in range(start, len(text)):
        if scan.step(text[i]):
            yield i, text[i]
    if state is not None:
        state["open_string"] = scan.in_str


def _balanced_span(text: str, start: int) -> str:
    """The text from ``start`` to the bracket that closes it (or the end), honouring strings."""
    depth = 0
    for i, ch in _structural(text, start):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return text[start:]


def _close_open(text: str) -> str:
    """Close an unterminated string and any open brackets (truncated generations)."""
    stack: list[str] = []
    state: dict[str, bool] = {}
    for _, ch in _structural(text, 0, state):
        if ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and stack:
            stack.pop()
    out = text + ('"' if state["open_string"] else "")
    out = re.sub(r",\s*$", "", out)
    return out + "".join(reversed(stack))


def extract_json(text: str) -> tuple[Any, bool]:
    """The first JSON object or array in ``text`` and whether it had to be repaired. ``(None, True)`` when
    nothing could be recovered."""
    t = _FENCE.sub("", text or "").strip()
    starts = [i for i in (t.find("{"), t.find("[")) if i >= 0]
    if not starts:
        return None, True
    span = _balanced_span(t, min(starts))
    try:
        return json.loads(span), False
    except json.JSONDecodeError:
        pass
    candidates = []
    s = span.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'")
    s = s.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    candidates.append(_TRAILING_COMMA.sub(r"\1", s))
    candidates.append(_close_open(candidates[-1]))
    if '"' not in s:
        candidates.append(_close_open(_TRAILING_COMMA.sub(r"\1", s.replace("'", '"'))))
    for c in candidates:
        try:
            return json.loads(c), True
        except json.JSONDecodeError:
            continue
    return None, True


def _strings(value: Any) -> list[str]:
    """Preference strings from the shapes small models produce: a list, a dict of lists or of strings,
    or a list of objects with one text field."""
    if isinstance(value, dict):
        for key in ("preferences", "preference", "prefs", "likes", "interests"):
            if key in value:
                return _strings(value[key])
        out: list[str] = []
        for v in value.values():
            out.extend(_strings(v))
        return out
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict):
                texts = [x for x in v.values() if isinstance(x, str)]
                if texts:
                    out.append(max(texts, key=len))
        return out
    if isinstance(value, str):
        return [value]
    return []


def normalise_text(s: str) -> str:
    return " ".join(_WORD.findall(s.lower()))


def _similar(a: str, b: str) -> bool:
    wa, wb = set(a.split()), set(b.split())
    if not wa or not wb:
        return a == b
    return a == b or len(wa & wb) / len(wa | wb) >= 0.8


def copies_title(pref: str, titles_norm: list[str]) -> bool:
    """True when a preference is (mostly) a history title: equal, or a title making up most of it."""
    p = normalise_text(pref)
    if not p:
        return False
    for t in titles_norm:
        if not t:
            continue
        if p == t or (len(t) >= 0.6 * len(p) and t in p) or (len(p) >= 8 and p in t):
            return True
    return False


@dataclass
class SlotCheck:
    """Preferences that passed validation, and why the others failed."""

    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def check_preferences(candidates: list[str], m: int, history_titles: list[str],
                      accepted: list[str] | None = None) -> SlotCheck:
    """Keep up to ``m`` candidates that are non-empty, not placeholders, not history titles and distinct
    from each other and from ``accepted`` (already accepted slots)."""
    out = SlotCheck(accepted=list(accepted or []))
    titles_norm = [normalise_text(t) for t in history_titles]
    for c in candidates:
        if len(out.accepted) >= m:
            out.reject("extra")
            continue
        text = _DANGLING.sub("", clean_text(c, 100)).strip(" .,;:-\"'")
        if len(normalise_text(text)) < 3 or _PLACEHOLDER.match(text) or _PLACEHOLDER.match(normalise_text(text)):
            out.reject("placeholder")
        elif copies_title(text, titles_norm):
            out.reject("copies_title")
        elif any(_similar(normalise_text(text), normalise_text(a)) for a in out.accepted):
            out.reject("duplicate")
        else:
            out.accepted.append(text)
    return out


def parse_preferences(text: str, m: int, history_titles: list[str]) -> tuple[SlotCheck, bool]:
    """Parse and validate one generation; returns the check and whether the JSON needed repair."""
    value, repaired = extract_json(text)
    if value is None:
        check = SlotCheck()
        check.reject("unparseable")
        return check, True
    return check_preferences(_strings(value), m, history_titles), repaired
