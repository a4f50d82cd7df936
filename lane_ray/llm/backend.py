"""The LLM backend protocol: batched chat generation with sampling parameters and an optional output
constraint, and scoring (the log-probability of given continuations). Implementations: ``transformers``
(CPU/GPU, HF directory or GGUF), ``vllm`` (GPU, Ray Data's ``ray.data.llm``) and ``openai`` (any
OpenAI-compatible server). Heavy imports stay inside them.

Constraints are backend-neutral :class:`Template` values: a sequence of fixed text, free JSON-string text
and choices among fixed options. The ``transformers`` backend enforces one with a logits processor; vLLM
gets the equivalent regular expression (:meth:`Template.to_regex`), and OpenAI-compatible servers one of
the forms they take: a JSON schema (:meth:`Template.to_json_schema`), a llama.cpp GBNF grammar
(:meth:`Template.to_gbnf`) or the regular expression.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Messages = list[dict[str, str]]

# Characters a free-text slot may not contain: it is the body of a JSON string, and brackets would let a
# weak model start a new structure inside it.
FORBIDDEN_FREE_CHARS = '"\\{}[]'


# Regex metacharacters escaped in literal text; everything else is written as itself.
_REGEX_META = set("\\.^$*+?()[]{}|")
# The class of a free JSON-string slot without an allow-list.
_FREE_CLASS = '[^"\\\\{}\\[\\]\\x00-\\x1f]'


def _literal(text: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


def _class_char(ch: str) -> str:
    # inside [...]: ASCII punctuation as a \xNN escape, which every engine reads as the character itself
    return ch if ch.isalnum() or ord(ch) > 0x7F else f"\\x{ord(ch):02x}"


def _free_class(seg: FreeText) -> str:
    """The character class of a free text: its allow-list, or every JSON-string character but brackets."""
    allowed = sorted(set(seg.chars) - set(FORBIDDEN_FREE_CHARS))
    return "[" + "".join(_class_char(c) for c in allowed) + "]" if allowed else _FREE_CLASS


def _free_bounds(seg: FreeText, chars_per_token: int) -> tuple[int, int]:
    """Character bounds of a free text: at least one character when ``min_tokens`` > 0, at most
    ``max_tokens * chars_per_token``."""
    return (1 if seg.min_tokens else 0), max(1, seg.max_tokens * chars_per_token)


def _free_parts(seg: FreeText, chars_per_token: int, after_word: bool) -> list[str]:
    """A free text as character-class terms, each valid both in a regex and in GBNF (joined without or with
    spaces). After a word character of fixed text (``after_word``), a free text whose characters include the
    space opens with a space and then a non-space character: an engine that constrains characters, not tokens,
    would otherwise let one token run on from the fixed word ("with" + "ers": " withers"), which the
    ``transformers`` backend's token-level template never does (it forces the fixed text's own tokens)."""
    lo, hi = _free_bounds(seg, chars_per_token)
    cls = _free_class(seg)
    allowed = set(seg.chars) - set(FORBIDDEN_FREE_CHARS)
    if not after_word or (allowed and " " not in allowed):
        return [f"{cls}{{{lo},{hi}}}"]
    rest = max(hi, 2) - 2
    word = ("[" + "".join(_class_char(c) for c in sorted(allowed - {" "})) + "]") if allowed \
        else _FREE_CLASS.replace("\\x1f]", "\\x20]")
    parts = ["[\\x20]", word] + ([f"{cls}{{0,{rest}}}"] if rest else [])
    return parts if lo else ["(", *parts, ")?"]


def _ends_in_word(seg: object, before: str) -> bool:
    """Whether the text before the next segment ends with a letter or digit: ``before`` (the prefill) for the
    first segment, else the segment's text (every option of a choice)."""
    if seg is None:
        return bool(before) and before[-1].isalnum()
    if isinstance(seg, Text):
        return bool(seg.text) and seg.text[-1].isalnum()
    if isinstance(seg, Choice):
        return all(o[-1].isalnum() for o in seg.options)
    return False


# Pattern literals for JSON-schema ``pattern`` strings: llama.cpp's schema-to-grammar converter (and its Python
# port in llama-cpp-python) copies a pattern's literal text into a GBNF string, where only \" \\ \[ \] and
# \x.. \u.. \t \n \r are escapes: ``\.`` would be refused. So ``.``, ``^`` and ``$`` are one-character
# classes, and the other metacharacters (which it unescapes) a backslash escape; vLLM's engines and
# Python's ``re`` read both alike.
_PATTERN_CLASS = {".": "[.]", "^": "[\\x5e]", "$": "[$]"}
_PATTERN_ESCAPED = set("[]()|{}*+?")


def _pattern_literal(text: str) -> str:
    return "".join(_PATTERN_CLASS.get(ch) or ("\\" + ch if ch in _PATTERN_ESCAPED else ch) for ch in text)


def _gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (llama.cpp grammar syntax)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class UnsupportedTemplate(ValueError):
    """A template that a constraint form cannot express (e.g. a JSON schema for a reply that is not JSON)."""


# Placeholders for the non-fixed segments while the skeleton (prefill + template) is read as JSON: characters
# of Unicode's private use area, which no template text carries (checked).
_HOLE_OPEN, _HOLE_CLOSE = "\ue000", "\ue001"
_HOLE = re.compile(_HOLE_OPEN + r"(\d+)" + _HOLE_CLOSE)


class JsonStringState:
    """Where a scan of JSON text stands relative to strings: inside one (``in_str``), right after a backslash in
    one (``esc``). The one implementation of that scan, for templates and for parsing replies."""

    __slots__ = ("esc", "in_str")

    def __init__(self, in_str: bool = False, esc: bool = False) -> None:
        self.in_str, self.esc = in_str, esc

    def step(self, ch: str) -> bool:
        """Advance over one character; True when it is structural (outside every string, not a quote)."""
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
            return False
        if ch == '"':
            self.in_str = True
            return False
        return True


def _json_string_state(text: str, in_str: bool, esc: bool) -> tuple[bool, bool]:
    """Whether JSON text that was inside a string (``in_str``, after a backslash: ``esc``) is inside one after
    ``text``."""
    state = JsonStringState(in_str, esc)
    for ch in text:
        state.step(ch)
    return state.in_str, state.esc


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one batch."""

    max_new_tokens: int = 96
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    seed: int = 0
    stop: tuple[str, ...] = ()
    # OpenAI semantics: each generated token's logit is lowered by this times how often it was generated
    # before in the same output (keeps a small model from copying one phrase into every slot)
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Text:
    """Fixed text, emitted verbatim."""

    text: str


@dataclass(frozen=True)
class FreeText:
    """The body of a JSON string: ``min_tokens..max_tokens`` tokens without quotes, backslashes, brackets or
    control characters and, when ``chars`` is set, made of those characters only (e.g. letters and spaces:
    words, not lists of years). It ends where the model writes the closing ``"``, so the next segment must
    be a :class:`Text` starting with ``"``; after ``max_tokens`` the quote is forced. No token may appear twice
    in one free text, nor a two-token sequence of an earlier free text of the same output (a small model's
    loops and copies; enforced by the ``transformers`` backend only)."""

    min_tokens: int = 1
    max_tokens: int = 16
    chars: str = ""
    # lower-case words the text must not write (e.g. genre names in a phrase about one genre): no word of the
    # text is one of them, begins with four or more of their letters, or extends one ("dramas"); the
    # transformers backend enforces it token by token, other engines ignore it
    avoid: tuple[str, ...] = ()
    # lower-case words the text is steered towards (e.g. the words of the reason it must state): a token that
    # writes the next letters of one of them gets ``prefer_bias`` added to its logit, until the output's free
    # texts have written the word once. A soft push, not a rule: the model may still write other words
    # (transformers backend only, like ``avoid``)
    prefer: tuple[str, ...] = ()
    prefer_bias: float = 0.0
    # added to ``prefer_bias`` for the tokens that continue a ``prefer`` word the text has begun (three letters
    # or more: "dar" of "dark"), so that a begun word is finished rather than bent into another ("darling")
    finish_bias: float = 0.0
    # no word of the text shares its first four letters with a word of an earlier free text of the same output
    # that also sets it ("focused" after "focus", "darker" after "dark"): near-twin phrases in one list state
    # one thing twice. Words under four letters and the ``repeatable`` ones (function words) stay free
    # (transformers backend only, like ``avoid``)
    distinct_words: bool = False
    repeatable: tuple[str, ...] = ()


def word_stems(text: str, repeatable: tuple[str, ...] = ()) -> set[str]:
    """The first four letters of each word of ``text`` (lower-cased) of four letters or more that is not one of
    ``repeatable``: what :attr:`FreeText.distinct_words` keeps later free texts from writing again."""
    return {w[:4] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in repeatable}


def spells(word: str, words: tuple[str, ...]) -> bool:
    """Whether a (partial) word spells one of ``words`` (lower-case): it is one of them, or, for words of four
    letters or more, it is their first four letters or more, or it extends one ("dram", "drama", "dramas" for
    "drama"; "dra" and "dream" stay allowed: shorter fragments begin too many other words)."""
    return any(word == w or (len(w) >= 4 and ((len(word) >= 4 and w.startswith(word)) or word.startswith(w)))
               for w in words)


def heads_towards(word: str, words: tuple[str, ...]) -> bool:
    """Whether a (partial) word of two letters or more is on the way to one of ``words``: it is one of them or
    a prefix of one (``"dra"``, ``"drama"`` for ``"drama"``; not ``"dramas"`` or ``"d"``)."""
    return len(word) >= 2 and any(w.startswith(word) for w in words)


def unwritten(prefer: tuple[str, ...], text: str) -> tuple[str, ...]:
    """The words of ``prefer`` that ``text`` (the row's free texts so far) has not written yet: a word counts as
    written when a finished word of the text is it or shares its first four letters ("romantic" for
    "romance"). The push ends once the word is there; pushing on only makes the model write variants of it
    (a free text may not repeat a token)."""
    words, cur = [], ""
    for ch in text:
        if ch.isalpha():
            cur += ch
        elif cur:
            words.append(cur)
            cur = ""
    return tuple(w for w in prefer
                 if not any(x == w or (min(len(x), len(w)) >= 4 and x[:4] == w[:4]) for x in words))


@dataclass(frozen=True)
class Choice:
    """Exactly one of ``options`` (fixed strings, e.g. genre names or ``low|medium|high``). ``distinct``: an
    option already picked by an earlier distinct Choice with the same options in this output is not offered
    again (enforced by the ``transformers`` backend; regex engines cannot express it)."""

    options: tuple[str, ...]
    distinct: bool = False
    # options the pick is steered towards: the tokens on the way to one of them get ``prefer_bias`` added to
    # their logit. A soft push, not a rule: any option may still be picked (transformers backend only)
    prefer: tuple[str, ...] = ()
    prefer_bias: float = 0.0

    def __post_init__(self) -> None:
        if not self.options or any(not o for o in self.options):
            raise ValueError("Choice needs at least one non-empty option")
        unknown = sorted(set(self.prefer) - set(self.options))
        if unknown:
            raise ValueError(f"Choice.prefer names options it does not offer: {unknown}")


Segment = Text | FreeText | Choice


@dataclass(frozen=True)
class Template:
    """What the generated text (after the prefill) must look like: its segments in order, then EOS."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        for i, seg in enumerate(self.segments):
            if isinstance(seg, FreeText):
                nxt = self.segments[i + 1] if i + 1 < len(self.segments) else None
                if not (isinstance(nxt, Text) and nxt.text.startswith('"')):
                    raise ValueError(f"segment {i}: FreeText must be followed by Text starting with '\"'")
                if not 0 <= seg.min_tokens <= seg.max_tokens:
                    raise ValueError(f"segment {i}: need 0 <= min_tokens <= max_tokens")

    def to_regex(self, chars_per_token: int = 8) -> str:
        """An equivalent regular expression, for engines with regex-guided decoding (vLLM structured outputs,
        OpenAI-compatible servers that accept one). Token bounds become character bounds (at least one
        character when ``min_tokens`` > 0, at most ``max_tokens * chars_per_token``); token-level rules
        (``Choice.distinct``, no repeated free tokens) have no regex form. Only syntax every engine vLLM may
        pick reads alike (xgrammar, llguidance, outlines): escaped metacharacters, plain ``(a|b)`` groups,
        one character class per free text."""
        parts = []
        for seg in self.segments:
            if isinstance(seg, Text):
                parts.append(_literal(seg.text))
            elif isinstance(seg, Choice):
                parts.append("(" + "|".join(_literal(o) for o in seg.options) + ")")
            else:
                lo, hi = _free_bounds(seg, chars_per_token)
                parts.append(f"{_free_class(seg)}{{{lo},{hi}}}")
        return "".join(parts)

    def to_gbnf(self, prefill: str = "", chars_per_token: int = 8) -> str:
        """A llama.cpp GBNF grammar (the ``grammar`` request field of llama.cpp's servers) for ``prefill`` followed
        by this template: the reply a server writes when it cannot continue a prefilled assistant turn. Fixed text
        and choices are literals, a free text its character class (as in :meth:`to_regex`) with a ``{min,max}``
        repetition: the same character bounds as :meth:`to_regex`, except that a free text right after a
        letter or digit of fixed text opens with a space and a non-space character (a character-level engine
        would otherwise let one token run on from the fixed word: " movies with" + "ers"). Every template can be
        written so; the token-level rules have no grammar form (as for the regex)."""
        parts = [_gbnf_literal(prefill)] if prefill else []
        prev: object = None
        for seg in self.segments:
            if isinstance(seg, Text):
                if seg.text:
                    parts.append(_gbnf_literal(seg.text))
            elif isinstance(seg, Choice):
                parts.append("(" + " | ".join(_gbnf_literal(o) for o in seg.options) + ")")
            else:
                parts.extend(_free_parts(seg, chars_per_token, _ends_in_word(prev, prefill)))
            prev = seg
        return "root ::= " + (" ".join(parts) if parts else '""')

    def to_json_schema(self, prefill: str = "", chars_per_token: int = 8) -> dict:
        """A JSON schema whose instances are the replies ``prefill`` + this template can give, for servers that
        constrain replies by a schema (OpenAI's ``response_format`` ``json_schema``, llama-cpp-python's
        ``json_object`` with a ``schema``). Raises :class:`UnsupportedTemplate` when the template is not
        JSON-shaped: the skeleton (prefill, fixed text, and a placeholder for each choice and free text) must
        parse as JSON with every free text inside a string, and every key fixed.

        Objects list their keys as ``required`` in order with ``additionalProperties: false``; arrays have
        exactly their length (``items`` when every element has one schema, else ``prefixItems``); a string of
        fixed text is an ``enum`` of it, a string that holds a choice alone an ``enum`` of its options, any
        other string a ``pattern`` anchored with ``^...$`` (fixed text as literals, a choice as an ``(a|b)``
        group, a free text as in :meth:`to_gbnf`: its character class with the bounds of :meth:`to_regex`, opening
        with a space after a fixed word); a choice where a JSON
        value stands (e.g. a number) is an ``enum`` of its options read as JSON. Layout (whitespace between
        tokens) is up to the server; the values are not.

        Fixed text or options holding a quote, a backslash or a control character inside a string cannot be
        expressed: pattern-to-grammar converters disagree on whether a pattern reads the JSON text or the
        decoded value (llama.cpp's reads the text, vLLM's the value); use the grammar form for them."""
        holes: list[tuple[Choice | FreeText, bool]] = []  # each with whether it follows a word character
        bare: set[int] = set()
        skeleton, in_str, esc = prefill, *_json_string_state(prefill, False, False)
        prev: object = None
        for i, seg in enumerate(self.segments):
            after_word, prev = _ends_in_word(prev, prefill), seg
            if isinstance(seg, Text):
                skeleton += seg.text
                in_str, esc = _json_string_state(seg.text, in_str, esc)
                continue
            mark = f"{_HOLE_OPEN}{len(holes)}{_HOLE_CLOSE}"
            if not in_str:
                if isinstance(seg, FreeText):
                    raise UnsupportedTemplate(f"segment {i}: a free text outside a JSON string")
                bare.add(len(holes))
                mark = '"' + mark + '"'
            holes.append((seg, after_word))
            skeleton += mark
        if _HOLE_OPEN in prefill or any(_HOLE_OPEN in s.text for s in self.segments if isinstance(s, Text)):
            raise UnsupportedTemplate("the template's text holds a private-use character U+E000")
        try:
            value = json.loads(skeleton)
        except json.JSONDecodeError as e:
            raise UnsupportedTemplate(f"prefill + template is not JSON ({e.msg} at character {e.pos} of "
                                      f"{skeleton[max(0, e.pos - 20): e.pos + 20]!r})") from None
        return _schema_of(value, holes, bare, chars_per_token)

    def max_chars(self, chars_per_token: int = 8) -> int:
        """The longest text :meth:`to_regex` accepts; every token is at least one character, so it also
        bounds the tokens a constrained generation can take."""
        n = 0
        for seg in self.segments:
            if isinstance(seg, Text):
                n += len(seg.text)
            elif isinstance(seg, Choice):
                n += max(len(o) for o in seg.options)
            else:
                n += max(1, seg.max_tokens * chars_per_token)
        return n

    def matches(self, text: str) -> bool:
        """Whether ``text`` has this template's shape (character bounds as in :meth:`to_regex`)."""
        return re.fullmatch(self.to_regex(chars_per_token=64), text, flags=re.DOTALL) is not None


def _decoded(text: str, where: str, raw: bool = True) -> str:
    """Template text that sits inside a JSON string, decoded (``\\"`` -> ``"``) when ``raw``, and checked to be
    expressible in a schema pattern (no quote, backslash or control character)."""
    try:
        value = json.loads('"' + text + '"') if raw else text
    except json.JSONDecodeError:
        raise UnsupportedTemplate(f"{where}: {text!r} is not the inside of a JSON string") from None
    if any(ch in '"\\' or ord(ch) < 0x20 for ch in value):
        raise UnsupportedTemplate(f"{where}: {value!r} holds a quote, backslash or control character, which "
                                  "schema patterns cannot carry portably (use the grammar form)")
    return value


def _schema_of(value: object, holes: list[tuple[Choice | FreeText, bool]], bare: set[int], cpt: int) -> dict:
    if isinstance(value, dict):
        if any(_HOLE_OPEN in k for k in value):
            raise UnsupportedTemplate("a JSON key is not fixed text")
        return {"type": "object", "properties": {k: _schema_of(v, holes, bare, cpt) for k, v in value.items()},
                "required": list(value), "additionalProperties": False}
    if isinstance(value, list):
        items = [_schema_of(v, holes, bare, cpt) for v in value]
        n = len(items)
        if items and all(x == items[0] for x in items):
            return {"type": "array", "items": items[0], "minItems": n, "maxItems": n}
        return {"type": "array", "prefixItems": items, "items": False, "minItems": n, "maxItems": n}
    if not isinstance(value, str):
        return {"enum": [value]}
    pieces = _HOLE.split(value)  # text, hole, text, hole, ..., text
    if len(pieces) == 1:
        return {"type": "string", "enum": [value]}
    if len(pieces) == 3 and not pieces[0] and not pieces[2]:
        k = int(pieces[1])
        seg = holes[k][0]
        if k in bare:
            assert isinstance(seg, Choice)
            try:
                return {"enum": [json.loads(o) for o in seg.options]}
            except json.JSONDecodeError:
                raise UnsupportedTemplate(f"a choice outside a JSON string has an option that is not a JSON value: "
                                          f"{seg.options}") from None
        if isinstance(seg, Choice):
            return {"type": "string", "enum": [_decoded(o, "choice option") for o in seg.options]}
    pattern = []
    for j, piece in enumerate(pieces):
        if j % 2 == 0:
            pattern.append(_pattern_literal(_decoded(piece, "fixed text", raw=False)) if piece else "")
            continue
        seg, after_word = holes[int(piece)]
        if isinstance(seg, Choice):
            pattern.append("(" + "|".join(_pattern_literal(_decoded(o, "choice option")) for o in seg.options) + ")")
        else:
            pattern.extend(_free_parts(seg, cpt, after_word))
    return {"type": "string", "pattern": "^" + "".join(pattern) + "$"}


def json_string_array(m: int, slots_done: int = 0, min_tokens: int = 2, max_tokens: int = 16,
                      close: str = "]}", head: tuple[Segment, ...] = (), chars: str = "") -> Template:
    """The rest of ``[..."s1", "s2", ..., "sm"]<close>`` when generation starts inside string
    ``slots_done + 1`` (the prefill ends with its opening quote). ``head`` segments open every slot
    (e.g. a :class:`Choice` that grounds it in a vocabulary)."""
    segs: list[Segment] = []
    for k in range(slots_done, m):
        segs.extend(head)
        segs.append(FreeText(min_tokens, max_tokens, chars))
        segs.append(Text('", "' if k < m - 1 else '"' + close))
    return Template(tuple(segs))


@dataclass
class Generation:
    """One completion: the text after the prefill, new tokens generated, and why generation stopped."""

    text: str
    new_tokens: int
    finish_reason: str = "stop"
    extra: dict = field(default_factory=dict)


Constraint = Template | Sequence[Template | None] | None


def per_row(constraint: Constraint, n: int) -> list[Template | None]:
    """``constraint`` as one template (or None) per conversation: a single :class:`Template` applies to all
    ``n``; a sequence must have exactly ``n`` entries (e.g. a template naming each row's own target)."""
    if constraint is None or isinstance(constraint, Template):
        return [constraint] * n
    rows = list(constraint)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} constraints for {n} conversations: give one per conversation")
    for i, c in enumerate(rows):
        if c is not None and not isinstance(c, Template):
            raise TypeError(f"constraint {i}: expected a Template or None, got {type(c).__name__}")
    return rows


@runtime_checkable
class LLMBackend(Protocol):
    """Batched chat generation. ``prefill`` (optional) is the beginning of the assistant's reply; the
    returned text continues it. With ``constraint``, the text matches it (see :class:`Template`): one
    template for every conversation, or a sequence with one template (or None) per conversation."""

    model_id: str

    def generate(self, conversations: list[Messages], params: GenerationParams, prefill: str = "",
                 constraint: Constraint = None) -> list[Generation]: ...

    def score(self, conversations: list[Messages], continuations: list[str], prefill: str = "") -> list[float]:
        """One float per (conversation, continuation) pair, in input order: the sum of the natural-log
        probabilities of the continuation's tokens after the rendered prompt (chat template with the assistant
        header, then ``prefill``). Deterministic: no sampling. Backends that cannot score raise a
        :class:`~lane_ray.errors.LaneError` saying why (e.g. a server that returns no prompt logprobs)."""
        ...
