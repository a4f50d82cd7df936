"""Constrained decoding on token ids: a :class:`~lane_ray.llm.backend.Template` enforced exactly, token by
token, by :class:`TemplateProcessor` (fixed text forced, choices walked through a token trie, free text held to
its character set and bounds, steering biases), over a tokenizer's vocabulary read once
(:class:`TokenVocabulary`). The ``transformers`` backend's decoding loop (``lane_ray/llm/decoding.py``) drives
it; it is also an HF ``LogitsProcessor`` for ``model.generate``."""

from __future__ import annotations

import unicodedata
from typing import Any

from lane_ray.errors import LaneError
from lane_ray.llm.backend import (
    FORBIDDEN_FREE_CHARS,
    Choice,
    Constraint,
    FreeText,
    Template,
    Text,
    heads_towards,
    per_row,
    spells,
    unwritten,
    word_stems,
)


def _letters(text: str) -> tuple[str, str]:
    """(leading letter run, trailing letter run) of ``text``, lower-cased."""
    t = text.lower()
    a = 0
    while a < len(t) and t[a].isalpha():
        a += 1
    b = len(t)
    while b > 0 and t[b - 1].isalpha():
        b -= 1
    return t[:a], t[b:]


def _first_word(piece: str) -> str:
    """The first run of letters of a token, after any leading space or punctuation, lower-cased."""
    t = piece.lower()
    while t and not t[0].isalpha():
        t = t[1:]
    return _letters(t)[0]


def avoided(piece: str, words: tuple[str, ...]) -> bool:
    """Whether a token spells one of ``words`` when it starts a word: the first run of letters of the piece
    (after any leading space or punctuation) :func:`spells` one of them."""
    if not words:
        return False
    first = _first_word(piece)
    return bool(first) and spells(first, words)


_MAX_STEMS = 50_000  # cached stem bans (a few hundred token ids each) before the cache starts afresh


class TokenVocabulary:
    """What a constraint needs to know of a tokenizer, computed once per backend: the tokens allowed inside
    a JSON string (:data:`FORBIDDEN_FREE_CHARS` and control characters excluded), the ``"`` token, EOS,
    and cached tokenisations of fixed texts and :class:`Choice` tries."""

    def __init__(self, tokenizer: Any) -> None:
        import torch

        self.tokenizer = tokenizer
        vocab = len(tokenizer)
        self.size = vocab
        self.eos = tokenizer.eos_token_id
        special = set(tokenizer.all_special_ids)
        self.pieces = ["" if i in special else tokenizer.decode([i]) for i in range(vocab)]
        content = torch.zeros(vocab, dtype=torch.bool)
        quote = []
        for i, s in enumerate(self.pieces):
            if s == '"':
                quote.append(i)
            if s and not any(ch in FORBIDDEN_FREE_CHARS or unicodedata.category(ch)[0] == "C" for ch in s):
                content[i] = True
        if not quote:
            raise LaneError("tokenizer has no token for '\"'; constrained decoding is not possible with it")
        self.content = content
        self.quote = quote[0]
        self._texts: dict[str, list[int]] = {}
        self._tries: dict[tuple[str, ...], dict] = {}
        self._masks: dict[tuple[str, tuple[str, ...]], Any] = {("", ()): content}
        self._bans: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        self._runs: list[tuple[int, str]] | None = None
        self._word_starts: dict[str, list[int]] = {}
        self._glued: dict[tuple[str, str], list[int]] = {}
        self._stem_starts: dict[str, list[int]] = {}
        self._exact: dict[str, list[int]] = {}
        self._first_words: list[tuple[int, str]] | None = None

    def _letter_runs(self) -> list[tuple[int, str]]:
        """(token, leading letter run) of the tokens that continue a word: those starting with a letter."""
        if self._runs is None:
            self._runs = [(i, _letters(p)[0]) for i, p in enumerate(self.pieces) if p and p[0].isalpha()]
        return self._runs

    def towards(self, word: str, prefer: tuple[str, ...]) -> list[int]:
        """Tokens that write the next letters of a word of ``prefer`` (:func:`heads_towards`): those that start
        a new word on the way to one (" dra", " drama"), and those that, glued to the partial ``word`` being
        written ("" at a word boundary), continue it towards one ("dr" + "ama"). Cached per word of ``prefer``,
        not per set: rows steer towards different and shrinking sets of words."""
        out: set[int] = set()
        for w in prefer:
            out.update(self._word_starts_towards(w))
            if w.startswith(word):
                out.update(self.glued_towards(word, w))
        return sorted(out)

    def _word_starts_towards(self, w: str) -> list[int]:
        if w not in self._word_starts:
            # a leading space or punctuation: the token starts a word
            self._word_starts[w] = [i for i, piece in enumerate(self.pieces)
                                    if piece and not piece[0].isalpha() and heads_towards(_first_word(piece), (w,))]
        return self._word_starts[w]

    def glued_towards(self, word: str, w: str) -> list[int]:
        key = (word, w)  # word is a prefix of w: at most len(w) + 1 entries per w
        if key not in self._glued:
            self._glued[key] = [i for i, run in self._letter_runs() if heads_towards(word + run, (w,))]
        return self._glued[key]

    def continuation_ban(self, word: str, avoid: tuple[str, ...]) -> list[int]:
        """Tokens that, glued to the partial ``word`` being written, would spell a word of ``avoid``
        (:func:`spells`): "dr" + "ama", "dra" + "m". Computed once per (word, avoid), only where ``word`` begins
        one of them."""
        key = (word, avoid)
        if key not in self._bans:
            ban: list[int] = []
            if any(w.startswith(word) for w in avoid):
                ban = [i for i, run in self._letter_runs() if spells(word + run, avoid)]
            self._bans[key] = ban
        return self._bans[key]

    def stem_ban(self, stem: str, repeatable: tuple[str, ...] = ()) -> list[int]:
        """Tokens whose first word begins with ``stem`` (four letters, :func:`word_stems`), except those whose
        first word is one of ``repeatable`` ("them" stays allowed after "theme"). Cached per stem and per
        repeatable word, not per set: each row bans its own, growing set of stems."""
        if stem not in self._stem_starts:
            if len(self._stem_starts) >= _MAX_STEMS:  # a long-lived replica meets ever new words
                self._stem_starts.clear()
                self._bans.clear()  # holds the stems' continuation bans too
            self._stem_starts[stem] = [i for i, w in self._words() if w.startswith(stem)]
        ban = self._stem_starts[stem]
        keep = [w for w in repeatable if w.startswith(stem)]
        if keep:
            exempt = {i for w in keep for i in self._exact_word(w)}
            ban = [i for i in ban if i not in exempt]
        return ban

    def stem_continuation_ban(self, word: str, stem: str, repeatable: tuple[str, ...] = ()) -> list[int]:
        """Tokens that, glued to the partial ``word`` (a proper prefix of ``stem``), make a word that begins
        with ``stem``, except where the word made is one of ``repeatable``."""
        ban = self.continuation_ban(word, (stem,))
        if any(w.startswith(stem) for w in repeatable):
            ban = [i for i in ban if word + _letters(self.pieces[i])[0].lower() not in repeatable]
        return ban

    def _words(self) -> list[tuple[int, str]]:
        """(token, first word) of the tokens that write letters (see :func:`_first_word`)."""
        if self._first_words is None:
            self._first_words = [(i, w) for i, p in enumerate(self.pieces) if p and (w := _first_word(p))]
        return self._first_words

    def _exact_word(self, word: str) -> list[int]:
        if word not in self._exact:
            self._exact[word] = [i for i, w in self._words() if w == word]
        return self._exact[word]

    def content_mask(self, chars: str, avoid: tuple[str, ...] = ()) -> Any:
        """Tokens allowed in free text, restricted to those made of ``chars`` only when it is set, and without
        the tokens that spell a word of ``avoid`` (see :func:`avoided`)."""
        key = (chars, avoid)
        if key not in self._masks:
            import torch

            allowed = set(chars)
            ok = torch.tensor([bool(s) and (not chars or set(s) <= allowed) and not avoided(s, avoid)
                               for s in self.pieces], dtype=torch.bool)
            self._masks[key] = self.content & ok
        return self._masks[key]

    def encode(self, text: str) -> list[int]:
        if text not in self._texts:
            self._texts[text] = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        return self._texts[text]

    def trie(self, options: tuple[str, ...]) -> dict:
        """Token trie of the options: ``{token: node}``; a node's key ``None`` holds the option ending there."""
        if options not in self._tries:
            root: dict = {}
            for opt in options:
                node = root
                for tok in self.encode(opt):
                    node = node.setdefault(tok, {})
                node[None] = opt
            self._tries[options] = root
        return self._tries[options]


class TemplateProcessor:
    """Logits processor enforcing a :class:`Template` on every sequence of a batch (one template for all rows,
    or one per row; a row whose template is None is unconstrained).

    Per row it tracks the current segment: fixed :class:`Text` is forced token by token; :class:`FreeText`
    allows content tokens, the closing ``"`` once ``min_tokens`` are written, and forces it after
    ``max_tokens`` (the rest of the following Text is then forced); a :class:`Choice` walks a token trie of
    its options, and where an option is complete but also the prefix of a longer one, the next segment's
    first tokens are allowed too. After the last segment only EOS is allowed.
    """

    def __init__(self, vocab: TokenVocabulary, template: Constraint, batch_size: int, device: Any,
                 frequency_penalty: float = 0.0) -> None:
        self.v = vocab
        self.penalty = frequency_penalty
        self.counts: list[dict[int, int]] = [{} for _ in range(batch_size)]
        templates = per_row(template, batch_size)
        # a row without a template is free: only the frequency penalty applies to it
        self.free_rows = [t is None for t in templates]
        self.free = all(self.free_rows)
        self.segs = [(t or Template(())).segments for t in templates]  # per row
        # one content mask per distinct FreeText character set, on the model's device
        self.masks = {(seg.chars, seg.avoid): vocab.content_mask(seg.chars, seg.avoid).to(device)
                      for segs in self.segs for seg in segs if isinstance(seg, FreeText)}
        self.content = vocab.content.to(device)
        self.device = device
        self.start: int | None = None
        self.seg = [0] * batch_size
        self.queue: list[list[int]] = [[] for _ in range(batch_size)]
        self.node: list[dict] = [{} for _ in range(batch_size)]
        self.count = [0] * batch_size
        self.used: list[list[int]] = [[] for _ in range(batch_size)]
        self.word = [""] * batch_size  # the partial word a free text ends with (for FreeText.avoid)
        self.written = [""] * batch_size  # the row's free texts so far (for FreeText.prefer)
        self.stems: list[set[str]] = [set() for _ in range(batch_size)]  # for FreeText.distinct_words
        self.stem_banned: list[list[int]] = [[] for _ in range(batch_size)]
        self.picked: list[dict[tuple[str, ...], set[str]]] = [{} for _ in range(batch_size)]
        self.bigrams: list[dict[int, set[int]]] = [{} for _ in range(batch_size)]
        for row in range(batch_size):
            self._enter(row, 0)

    # -- state machine ----------------------------------------------------------------------------------
    def _enter(self, row: int, i: int, after_quote: bool = False) -> None:
        """Move ``row`` to segment ``i`` (skipping segments that need no token)."""
        segs = self.segs[row]
        while i < len(segs):
            seg = segs[i]
            if isinstance(seg, Text):
                toks = self.v.encode(seg.text[1:] if after_quote else seg.text)
                after_quote = False
                if toks:
                    self.seg[row], self.queue[row] = i, list(toks)
                    return
                i += 1
                continue
            self.seg[row] = i
            if isinstance(seg, FreeText):
                self.count[row] = 0
                self.used[row] = []
                self.word[row] = ""
            else:
                self.node[row] = self.v.trie(self._options(row, seg))
            return
        self.seg[row] = len(segs)

    def _options(self, row: int, seg: Choice) -> tuple[str, ...]:
        if not seg.distinct:
            return seg.options
        taken = self.picked[row].get(seg.options, set())
        left = tuple(o for o in seg.options if o not in taken)
        return left or seg.options  # more distinct slots than options: allow repeats rather than fail

    def _starts(self, row: int, i: int) -> list[int] | Any:
        """First tokens segment ``i`` accepts for ``row``: token ids, or the content mask of a FreeText."""
        if i >= len(self.segs[row]):
            return [self.v.eos]
        seg = self.segs[row][i]
        if isinstance(seg, Text):
            toks = self.v.encode(seg.text)
            return toks[:1] if toks else self._starts(row, i + 1)
        if isinstance(seg, FreeText):
            return self.masks[(seg.chars, seg.avoid)]
        # options this row may still pick (a distinct choice's earlier picks excluded)
        return [t for t in self.v.trie(self._options(row, seg)) if t is not None]

    def _feed(self, row: int, tok: int) -> None:
        i = self.seg[row]
        if i >= len(self.segs[row]):
            return
        seg = self.segs[row][i]
        if isinstance(seg, Text):
            self.queue[row].pop(0)
            if not self.queue[row]:
                self._enter(row, i + 1)
        elif isinstance(seg, FreeText):
            if seg.prefer:
                self.written[row] += " " if tok == self.v.quote else (
                    self.v.pieces[tok].lower() if tok < len(self.v.pieces) else " ")
            if tok == self.v.quote:
                if seg.distinct_words:
                    self._close_words(row, seg)
                self._enter(row, i + 1, after_quote=True)
            else:
                if self.used[row]:
                    self.bigrams[row].setdefault(self.used[row][-1], set()).add(tok)
                if seg.avoid or seg.prefer or seg.distinct_words:
                    piece = self.v.pieces[tok] if tok < len(self.v.pieces) else ""
                    lead, tail = _letters(piece)
                    self.word[row] = (self.word[row] + piece.lower() if lead == piece.lower() else tail)
                self.count[row] += 1
                self.used[row].append(tok)
        else:
            node = self.node[row]
            if tok in node:
                node = node[tok]
                self.node[row] = node
                if None in node and len(node) == 1:  # a complete option that extends no further
                    self._pick(row, seg, node[None])
                    self._enter(row, i + 1)
            elif None in node:  # the option ended here; the token belongs to the next segment
                self._pick(row, seg, node[None])
                self._enter(row, i + 1)
                self._feed(row, tok)

    def _close_words(self, row: int, seg: FreeText) -> None:
        """A free text with ``distinct_words`` ended: its word stems join those later ones must not write."""
        text = "".join(self.v.pieces[t] for t in self.used[row] if t < len(self.v.pieces))
        new = word_stems(text, seg.repeatable) - self.stems[row]
        if new:
            self.stems[row] |= new
            banned = set(self.stem_banned[row])
            for stem in new:
                banned.update(self.v.stem_ban(stem, seg.repeatable))
            self.stem_banned[row] = sorted(banned)

    def _pick(self, row: int, seg: Any, option: str) -> None:
        if seg.distinct:
            self.picked[row].setdefault(seg.options, set()).add(option)

    def _allowed(self, row: int) -> Any:
        """A bool mask over the vocabulary, or a single forced token id."""
        import torch

        i = self.seg[row]
        if i >= len(self.segs[row]):
            return self.v.eos
        seg = self.segs[row][i]
        if isinstance(seg, Text):
            return self.queue[row][0]
        if isinstance(seg, FreeText):
            if self.count[row] >= seg.max_tokens:
                return self.v.quote
            mask = self.masks[(seg.chars, seg.avoid)].clone()
            mask[self.v.quote] = self.count[row] >= seg.min_tokens
            if seg.avoid and self.word[row]:
                ban = self.v.continuation_ban(self.word[row], seg.avoid)
                if ban:
                    mask[ban] = False
            if seg.distinct_words and self.stems[row]:
                if self.stem_banned[row]:
                    mask[self.stem_banned[row]] = False
                word = self.word[row]
                if 0 < len(word) < 4:
                    for stem in self.stems[row]:
                        if stem.startswith(word):
                            ban = self.v.stem_continuation_ban(word, stem, seg.repeatable)
                            if ban:
                                mask[ban] = False
            if self.used[row]:
                mask[self.used[row]] = False  # no token twice in one free text (a small model's loops)
                # nor a two-token sequence of an earlier free text (copying one phrase into every slot)
                nxt = self.bigrams[row].get(self.used[row][-1])
                if nxt:
                    mask[list(nxt)] = False
            return mask
        node = self.node[row]
        toks = [t for t in node if t is not None]
        if None in node:
            nxt = self._starts(row, i + 1)
            if not isinstance(nxt, list):
                mask = nxt.clone()
                mask[toks] = True
                return mask
            toks += nxt
        if len(toks) == 1:
            return toks[0]
        mask = torch.zeros_like(self.content)
        mask[toks] = True
        return mask

    def advance(self, row: int, tok: int) -> None:
        """Record that ``row`` wrote ``tok``: the frequency-penalty count and the constraint's state."""
        self.counts[row][tok] = self.counts[row].get(tok, 0) + 1
        if not self.free_rows[row]:
            self._feed(row, tok)

    def allowed(self, row: int) -> Any:
        """What ``row`` may write next: a single forced token id, a bool mask over the vocabulary, or None when
        the row is unconstrained."""
        return None if self.free_rows[row] else self._allowed(row)

    def apply(self, scores: Any, rows: list[int], allowed: list[Any] | None = None) -> Any:
        """Frequency penalty, mask and steering bonuses on ``scores`` ([len(rows), V]: one line per row of
        ``rows``, in that order), in place; ``allowed`` (one :meth:`allowed` value per row) when already
        computed."""
        import torch

        if self.penalty:
            for line, row in enumerate(rows):
                counts = self.counts[row]
                if counts:
                    idx = torch.tensor(list(counts), device=scores.device)
                    cnt = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
                    scores[line, idx] -= self.penalty * cnt
        if self.free:
            return scores
        neg = torch.finfo(scores.dtype).min
        width = scores.shape[1]
        for line, row in enumerate(rows):
            ok = allowed[line] if allowed is not None else self.allowed(row)
            if ok is None:
                continue
            if isinstance(ok, int):
                val = scores[line, ok].clone()
                scores[line].fill_(neg)
                scores[line, ok] = val if torch.isfinite(val) else 0.0
                continue
            if ok.shape[0] < width:  # the model's head may be wider than the tokenizer
                ok = torch.cat([ok, ok.new_zeros(width - ok.shape[0])])
            scores[line].masked_fill_(~ok[:width], neg)
            boost = self._preferred(row)
            if boost:
                seg = self.segs[row][self.seg[row]]
                idx = torch.tensor(boost, device=scores.device)
                scores[line, idx] = torch.where(ok[idx], scores[line, idx] + seg.prefer_bias, scores[line, idx])
                finish = self._finishing(row, seg)
                if finish:
                    idx = torch.tensor(finish, device=scores.device)
                    scores[line, idx] = torch.where(ok[idx], scores[line, idx] + seg.finish_bias, scores[line, idx])
        return scores

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """The ``transformers`` ``LogitsProcessor`` interface: the last column of ``input_ids`` is each row's
        newest token (none on the first call)."""
        if self.start is None:
            self.start = input_ids.shape[1]
        else:
            for row, tok in enumerate(input_ids[:, -1].tolist()):
                self.advance(row, tok)
        return self.apply(scores, list(range(scores.shape[0])))

    def _finishing(self, row: int, seg: Any) -> list[int]:
        """Tokens that get a free text's ``finish_bias`` on top: those continuing the begun word (three letters
        or more) towards an unwritten ``prefer`` word it is a proper prefix of."""
        word = self.word[row]
        if not isinstance(seg, FreeText) or not seg.finish_bias or len(word) < 3:
            return []
        left = [w for w in unwritten(seg.prefer, self.written[row]) if w.startswith(word) and w != word]
        return sorted({t for w in left for t in self.v.glued_towards(word, w)})

    def _preferred(self, row: int) -> list[int]:
        """Tokens that get the segment's ``prefer_bias`` at this step: in a free text those on the way to a
        ``prefer`` word (:meth:`TokenVocabulary.towards`), in a choice those on the way to a ``prefer`` option."""
        i = self.seg[row]
        seg = self.segs[row][i] if i < len(self.segs[row]) else None
        if isinstance(seg, (FreeText, Choice)) and seg.prefer and seg.prefer_bias:
            if isinstance(seg, FreeText):
                left = unwritten(seg.prefer, self.written[row])
                return self.v.towards(self.word[row], left) if left else []
            node = self.node[row]
            return [t for t in node if t is not None and _reaches(node[t], seg.prefer)]
        return []


def _reaches(node: dict, options: tuple[str, ...]) -> bool:
    """Whether a :meth:`TokenVocabulary.trie` node leads to one of ``options``."""
    return any(_reaches(v, options) if k is not None else v in options for k, v in node.items())


__all__ = ["TemplateProcessor", "TokenVocabulary", "avoided"]
