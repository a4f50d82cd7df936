from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lane_ray.config import DataConfig
from lane_ray.data.loaders import RawDataset
from lane_ray.data.preprocess import kcore, normalize_title, prepare
from lane_ray.data.schemas import catalog_table, interactions_table
from lane_ray.errors import DataError


def raw(rows, titles) -> RawDataset:
    u, i, t = (pa.array([r[k] for r in rows], pa.int64()) for k in range(3))
    ids = pa.array(list(titles.keys()), pa.int64())
    return RawDataset(interactions_table(u, i, t), catalog_table(ids, pa.array(list(titles.values()))), "toy", [])


@pytest.mark.parametrize(
    "src, want",
    [
        ("  Usual   Suspects, The ", "The Usual Suspects"),
        ("Rose &amp; Oud <b>Perfume</b>", "Rose & Oud Perfume"),
        ("Cafe\u0301", "Café"),  # NFC
        ("Tab\tand\nnewline", "Tab and newline"),
        ("Misérables, Les", "Les Misérables"),
        ("nan", ""),
        (None, ""),
    ],
)
def test_normalize_title(src, want):
    assert normalize_title(src) == want


@given(st.text(max_size=60))
def test_normalize_title_is_idempotent_and_single_line(s):
    once = normalize_title(s)
    assert normalize_title(once) == once
    assert "\n" not in once and once == once.strip()


def brute_kcore(users, items, uk, ik):
    keep = np.ones(len(users), bool)
    while True:
        changed = False
        for col, k in ((users, uk), (items, ik)):
            for v in set(col[keep]):
                m = keep & (col == v)
                if m.sum() < k:
                    keep[m] = False
                    changed = True
        if not changed:
            return keep


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=60), st.integers(0, 4), st.integers(0, 4))
def test_kcore_matches_brute_force(pairs, uk, ik):
    users = np.array([p[0] for p in pairs], dtype=np.int64)
    items = np.array([p[1] for p in pairs], dtype=np.int64)
    keep, _ = kcore(users, items, uk, ik)
    assert (keep == brute_kcore(users, items, uk, ik)).all()
    if keep.any():
        assert np.unique(users[keep], return_counts=True)[1].min() >= uk
        assert np.unique(items[keep], return_counts=True)[1].min() >= ik


def test_counts_every_removal_and_orders_with_stable_ties():
    rows = [
        (1, 10, 5), (1, 11, 5), (1, 12, 1), (1, 12, 1),  # exact duplicate of (1, 12, 1)
        (1, 99, 7),  # unknown item
        (2, 10, 1), (2, 13, 2),  # user 2 ends with 2 interactions once item 13 (empty title) is dropped
        (3, 10, 1), (3, 11, 2), (3, 12, 3),
    ]
    titles = {10: "Alpha", 11: "Beta", 12: "Gamma", 13: "  ", 14: "Unused"}
    p = prepare(raw(rows, titles), DataConfig())
    r = p.report
    assert r["duplicate_interactions"] == 1
    assert r["interactions_unknown_item"] == 2  # item 99 and item 13 (dropped for its empty title)
    assert r["empty_titles"] == 1
    assert r["users_too_short"] == 1 and r["interactions_of_short_users"] == 1
    assert r["catalog_items_without_interactions"] == 1
    got = list(zip(p.interactions["user_id"].to_pylist(), p.interactions["item_id"].to_pylist(), strict=True))
    # user 1: item 12 at t=1 first; items 10 and 11 tie at t=5 and keep their file order
    assert got == [(1, 12), (1, 10), (1, 11), (3, 10), (3, 11), (3, 12)]
    assert p.catalog["item_id"].to_pylist() == [10, 11, 12]
    s = p.stats()
    assert (s["users"], s["items"], s["interactions"]) == (2, 3, 6)
    assert s["seq_len"]["min"] == 3


def test_keep_cold_items_keeps_uninteracted_catalogue_items():
    rows = [(1, 10, 1), (1, 11, 2), (1, 12, 3)]
    titles = {10: "Alpha", 11: "Beta", 12: "Gamma", 14: "Unused"}
    dropped = prepare(raw(rows, titles), DataConfig())
    kept = prepare(raw(rows, titles), DataConfig(keep_cold_items=True))
    assert dropped.catalog["item_id"].to_pylist() == [10, 11, 12]
    assert kept.catalog["item_id"].to_pylist() == [10, 11, 12, 14]
    assert kept.report["catalog_items_without_interactions"] == 1
    assert kept.interactions.num_rows == dropped.interactions.num_rows == 3


def test_empty_title_placeholder_keeps_the_item():
    rows = [(1, 1, 1), (1, 2, 2), (1, 3, 3)]
    p = prepare(raw(rows, {1: "A", 2: "", 3: "C"}), DataConfig(empty_titles="placeholder"))
    assert p.catalog["title"].to_pylist() == ["A", "item 2", "C"]
    assert p.report["empty_titles"] == 1 and p.interactions.num_rows == 3


def test_kcore_defaults_and_overrides():
    rows = [(u, i, t) for t, (u, i) in enumerate([(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2),
                                                  (3, 4)])]
    titles = {1: "a", 2: "b", 3: "c", 4: "d"}
    assert prepare(raw(rows, titles), DataConfig()).stats()["items"] == 4  # off by default
    p = prepare(raw(rows, titles), DataConfig(), default_kcore=(3, 2))
    assert p.report["item_k_core"] == 2 and 4 not in p.catalog["item_id"].to_pylist()
    assert p.report["interactions_removed_by_kcore"] >= 1
    p = prepare(raw(rows, titles), DataConfig(item_k_core=0), default_kcore=(3, 2))
    assert p.report["item_k_core"] == 0


def test_max_users_and_min_rating():
    rows = [(u, i, i) for u in (1, 2, 3) for i in (1, 2, 3)]
    p = prepare(raw(rows, {1: "a", 2: "b", 3: "c"}), DataConfig(max_users=2))
    assert p.stats()["users"] == 2 and p.report["users_over_cap"] == 1


def test_everything_filtered_is_a_clear_error():
    with pytest.raises(DataError, match="no interactions left after preprocessing"):
        prepare(raw([(1, 1, 1), (1, 2, 2)], {1: "a", 2: "b"}), DataConfig())
