"""Pure helpers that decide what text a row embeds and under which key (no Ray, no torch).

A row is identified by its key columns (``item_id``, or ``user_id`` + ``pref_index``) and the SHA-1 of its
text. ``key64`` folds both into one uint64 for fast set membership over tens of millions of rows; the full
``text_sha1`` is stored with every embedding and checked again when parts are compacted.

Bad texts are handled as follows and counted by reason, never dropped silently:

=====================  =====================================================================================
``null_text``          NULL: not embedded (listed in the rejects file)
``empty_text``         empty or whitespace only: not embedded (listed in the rejects file)
``invalid_utf8``       bytes that are not UTF-8: decoded with U+FFFD replacements, embedded
``truncated``          longer than ``max_chars``: the first ``max_chars`` characters are embedded
``duplicate_key``      a key seen earlier in the input: the first row wins, later ones are rejected
=====================  =====================================================================================
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash of integers (vectorised)."""
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def key64(keys: list[np.ndarray], sha1_hex: list[str]) -> np.ndarray:
    """uint64 per row from integer key columns and the text's SHA-1."""
    h = np.array([int(s[:16], 16) for s in sha1_hex], dtype=np.uint64)
    for col in keys:
        h = splitmix64(h ^ splitmix64(np.asarray(col, dtype=np.int64).view(np.uint64)))
    return h


def id64(keys: list[np.ndarray]) -> np.ndarray:
    """uint64 per row from the key columns alone (to find duplicate keys)."""
    h = np.zeros(len(keys[0]), dtype=np.uint64)
    for col in keys:
        h = splitmix64(h ^ splitmix64(np.asarray(col, dtype=np.int64).view(np.uint64)))
    return h


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class CleanBatch:
    """Rows of one input batch after cleaning: ``valid`` marks rows that can be embedded."""

    texts: list[str]  # text to embed (cut to max_chars); "" where invalid
    sha1: list[str]  # SHA-1 of the full (decoded) text; "" where invalid
    valid: np.ndarray  # bool [N]
    reasons: list[str | None]  # rejection reason per row (None = embedded)
    counts: dict[str, int] = field(default_factory=dict)


def _decode_column(col: pa.Array | pa.ChunkedArray) -> tuple[list[str | None], int]:
    """Python strings from a string or binary column; invalid UTF-8 is replaced. Returns (texts, n_replaced)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col.validate(full=True)
            return col.to_pylist(), 0
        except pa.ArrowInvalid:
            col = col.view(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        out: list[str | None] = []
        bad = 0
        for b in col.to_pylist():
            if b is None:
                out.append(None)
                continue
            try:
                out.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(b.decode("utf-8", errors="replace"))
                bad += 1
        return out, bad
    return pc.cast(col, pa.string()).to_pylist(), 0


def clean_texts(col: pa.Array | pa.ChunkedArray, max_chars: int) -> CleanBatch:
    """Apply the rules in the module docstring to one column of texts."""
    raw, replaced = _decode_column(col)
    texts, sha, reasons = [], [], []
    counts = {"null_text": 0, "empty_text": 0, "invalid_utf8": replaced, "truncated": 0}
    for t in raw:
        if t is None:
            reasons.append("null_text")
        elif not t.strip():
            reasons.append("empty_text")
        else:
            reasons.append(None)
            t = t.strip()
            sha.append(text_sha1(t))
            if len(t) > max_chars:
                counts["truncated"] += 1
                t = t[:max_chars]
            texts.append(t)
            continue
        counts[reasons[-1]] += 1  # type: ignore[index]
        texts.append("")
        sha.append("")
    valid = np.array([r is None for r in reasons], dtype=bool)
    return CleanBatch(texts, sha, valid, reasons, counts)


def batch_keys(key_cols: list[np.ndarray], cb: CleanBatch) -> np.ndarray:
    """uint64 key per row of a cleaned batch; 0 where the row is not valid (never embedded)."""
    k64 = np.zeros(cb.valid.size, dtype=np.uint64)
    if cb.valid.any():
        sha = [s for s, v in zip(cb.sha1, cb.valid, strict=True) if v]
        k64[cb.valid] = key64([c[cb.valid] for c in key_cols], sha)
    return k64
