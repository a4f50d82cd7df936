"""Row cleaning and keys of the embedding stage (pure functions, no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from lane_ray.text.rows import clean_texts, id64, key64, text_sha1


def test_rules_for_bad_texts():
    col = pa.array([b"Toy Story", None, b"   ", b"Caf\xe9 Noir", b"x" * 50, b" Heat "], pa.binary())
    cb = clean_texts(col, max_chars=20)
    assert cb.reasons == [None, "null_text", "empty_text", None, None, None]
    assert cb.valid.tolist() == [True, False, False, True, True, True]
    assert cb.texts[3] == "Caf\ufffd Noir"  # replaced, still embedded
    assert cb.texts[4] == "x" * 20 and cb.sha1[4] == text_sha1("x" * 50)  # cut, keyed by the full text
    assert cb.texts[5] == "Heat" and cb.sha1[5] == text_sha1("Heat")
    assert cb.counts == {"null_text": 1, "empty_text": 1, "invalid_utf8": 1, "truncated": 1}


def test_string_columns_with_invalid_utf8_are_repaired():
    bad = pa.array([b"ok", b"\xff\xfe"], pa.binary()).view(pa.string())  # unchecked string data
    cb = clean_texts(bad, max_chars=100)
    assert cb.valid.all() and cb.counts["invalid_utf8"] == 1


def test_keys_depend_on_id_and_text():
    ids = np.array([1, 2, 1], dtype=np.int64)
    sha = [text_sha1("a"), text_sha1("a"), text_sha1("b")]
    k = key64([ids], sha)
    assert len(set(k.tolist())) == 3
    assert (key64([ids], sha) == k).all()  # deterministic
    assert id64([ids])[0] == id64([ids])[2] != id64([ids])[1]
    # two key columns: (user 1, pref 2) differs from (user 2, pref 1)
    a = key64([np.array([1, 2]), np.array([2, 1])], [text_sha1("t")] * 2)
    assert a[0] != a[1]


@given(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=200, unique=True))
def test_key64_has_no_collisions_on_distinct_ids(ids):
    k = key64([np.array(ids, dtype=np.int64)], [text_sha1("same")] * len(ids))
    assert np.unique(k).size == len(ids)
