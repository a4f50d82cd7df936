"""Unit tests of lane_ray.train: ranking metrics, features (preference / title tensors, shuffled control) and the
sampled-negatives protocol, against hand-computed values (no Ray, no torch training)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lane_ray.data.split import ItemIndex, LeaveOneOutSplit
from lane_ray.errors import DataError
from lane_ray.train.features import Features, preference_tensor, title_matrix
from lane_ray.train.loop import sampled_negatives
from lane_ray.train.metrics import rank_metrics, target_ranks

# -- metrics -------------------------------------------------------------------------------------------------


def test_rank_metrics_hand_computed():
    got = rank_metrics(np.array([0, 1, 4, 9, 25]))
    assert set(got) == {f"{m}@{k}" for m in ("ndcg", "hr", "mrr") for k in (5, 10, 20)}
    assert got["ndcg@5"] == pytest.approx(np.mean([1 / math.log2(2), 1 / math.log2(3), 1 / math.log2(6), 0, 0]))
    assert got["ndcg@10"] == pytest.approx(
        np.mean([1, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11), 0]))
    assert got["ndcg@20"] == pytest.approx(got["ndcg@10"])  # rank 25 is outside the top 20
    assert got["hr@5"] == pytest.approx(3 / 5)
    assert got["hr@10"] == pytest.approx(4 / 5)
    assert got["hr@20"] == pytest.approx(4 / 5)
    assert got["mrr@5"] == pytest.approx(np.mean([1, 1 / 2, 1 / 5, 0, 0]))
    assert got["mrr@10"] == pytest.approx(np.mean([1, 1 / 2, 1 / 5, 1 / 10, 0]))
    assert got["mrr@20"] == pytest.approx(got["mrr@10"])


def test_rank_metrics_edges():
    assert rank_metrics(np.array([0, 0])) == {f"{m}@{k}": 1.0 for m in ("ndcg", "hr", "mrr") for k in (5, 10, 20)}
    assert all(v == 0.0 for v in rank_metrics(np.array([], dtype=np.int64)).values())
    assert all(v == 0.0 for v in rank_metrics(np.array([20, 99])).values())
    got = rank_metrics(np.array([0, 2]), ks=(1, 3))
    assert got == pytest.approx({"ndcg@1": 0.5, "hr@1": 0.5, "mrr@1": 0.5,
                                 "ndcg@3": (1 + 1 / math.log2(4)) / 2, "hr@3": 1.0, "mrr@3": (1 + 1 / 3) / 2})
    # boundary: rank k - 1 is a hit, rank k is not
    assert rank_metrics(np.array([4]))["hr@5"] == 1.0
    assert rank_metrics(np.array([5]))["hr@5"] == 0.0


def test_target_ranks_counts_higher_and_ties_against_target():
    scores = np.array([
        [0.1, 0.5, 0.3, 0.9],  # target 0.5: one item higher
        [0.5, 0.5, 0.9, 0.1],  # target 0.5 tied with one other: 1 higher + 1 tie
        [2.0, 2.0, 2.0, 2.0],  # all equal: ranked last
        [3.0, -np.inf, 1.0, 0.0],  # target is the best, masked item below it
    ])
    target = np.array([0.5, 0.5, 2.0, 3.0])
    assert target_ranks(scores, target).tolist() == [1, 2, 3, 0]
    C = 101
    flat = np.zeros((2, C))
    assert target_ranks(flat, np.zeros(2)).tolist() == [C - 1, C - 1]
    assert rank_metrics(target_ranks(flat, np.zeros(2)))["hr@20"] == 0.0


# -- Features.shuffled ---------------------------------------------------------------------------------------


def tiny_split() -> tuple[LeaveOneOutSplit, ItemIndex]:
    """Six users over catalogue items 100..111 (items 110 and 111 never interacted with)."""
    seqs = {1: [100, 101, 102, 103], 2: [104, 100, 105], 3: [101, 101, 106, 107, 108],
            4: [109, 108, 107], 5: [100, 102, 104, 106, 108, 109], 7: [103, 105, 107]}
    rows = [(u, i, t) for u, items in seqs.items() for t, i in enumerate(items)]
    table = pa.table({name: pa.array([r[k] for r in rows], pa.int64())
                      for k, name in enumerate(("user_id", "item_id", "timestamp"))})
    split = LeaveOneOutSplit.from_interactions(table)
    return split, ItemIndex(np.concatenate([np.arange(100, 112), split.items]))


def features_with_prefs(U: int, m: int = 3, d: int = 2) -> Features:
    split, index = tiny_split()
    prefs = np.broadcast_to(np.arange(U, dtype=np.float32)[:, None, None], (U, m, d)).copy()  # row u holds u
    mask = (np.arange(U)[:, None] >> np.arange(m)[None] & 1).astype(bool)  # row u: bits of u
    return Features(split, index, prefs=prefs, pref_mask=mask)


@pytest.mark.parametrize("U", [2, 3, 5, 10, 17])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shuffled_is_a_derangement(U, seed):
    feats = features_with_prefs(U)
    orig_prefs, orig_mask = feats.prefs.copy(), feats.pref_mask.copy()
    out = feats.shuffled(seed)
    src = out.prefs[:, 0, 0].astype(np.int64)  # which user's preferences each user now has
    assert sorted(src.tolist()) == list(range(U))  # a permutation
    assert (src != np.arange(U)).all()  # nobody keeps their own
    assert np.array_equal(out.prefs, orig_prefs[src])
    assert np.array_equal(out.pref_mask, orig_mask[src])  # vectors and mask move together
    assert np.array_equal(feats.prefs, orig_prefs) and np.array_equal(feats.pref_mask, orig_mask)  # no mutation
    assert out.split is feats.split and out.index is feats.index
    assert np.array_equal(feats.shuffled(seed).prefs, out.prefs)  # reproducible


def test_shuffled_depends_on_seed_and_needs_preferences():
    feats = features_with_prefs(10)
    perms = {tuple(feats.shuffled(s).prefs[:, 0, 0].astype(int)) for s in range(5)}
    assert len(perms) > 1
    split, index = tiny_split()
    with pytest.raises(DataError, match="no preferences"):
        Features(split, index).shuffled()


# -- preference_tensor / title_matrix ------------------------------------------------------------------------


def fixed_list(vectors: list[list[float]], d: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors, np.float32).ravel(), pa.float32()), d)


def write_prefs(path: Path, rows: list[tuple[int, int, list[float]]], d: int = 2) -> Path:
    pq.write_table(pa.table({"user_id": pa.array([r[0] for r in rows], pa.int64()),
                             "slot": pa.array([r[1] for r in rows], pa.int64()),
                             "embedding": fixed_list([r[2] for r in rows], d)}), path)
    return path


def test_preference_tensor(tmp_path: Path):
    path = write_prefs(tmp_path / "preference_embeddings.parquet", [
        (30, 1, [5.0, 6.0]),
        (10, 0, [1.0, 2.0]),
        (99, 0, [9.0, 9.0]),  # not a split user: ignored
        (10, 2, [3.0, 4.0]),
        (5, 0, [8.0, 8.0]),  # below every split user: ignored
    ])
    users = np.array([10, 20, 30], dtype=np.int64)  # user 20 has no preferences
    prefs, mask = preference_tensor(path, users)
    assert prefs.shape == (3, 3, 2) and prefs.dtype == np.float32  # m = largest slot + 1
    assert mask.tolist() == [[True, False, True], [False, False, False], [False, True, False]]
    assert prefs[0].tolist() == [[1, 2], [0, 0], [3, 4]]
    assert prefs[2].tolist() == [[0, 0], [5, 6], [0, 0]]
    assert not prefs[1].any()

    prefs2, mask2 = preference_tensor(path, users, m=2)  # slot 2 dropped
    assert prefs2.shape == (3, 2, 2)
    assert mask2.tolist() == [[True, False], [False, False], [False, True]]
    prefs4, mask4 = preference_tensor(path, users, m=4)  # an extra, always-absent slot
    assert prefs4.shape == (3, 4, 2) and not mask4[:, 3].any()


def test_preference_tensor_rejects_bad_files(tmp_path: Path):
    bad_slot = write_prefs(tmp_path / "neg.parquet", [(1, -1, [1.0, 1.0])])
    with pytest.raises(DataError, match="negative preference slot"):
        preference_tensor(bad_slot, np.array([1]))
    var = tmp_path / "var.parquet"
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()), "slot": pa.array([0], pa.int64()),
                             "embedding": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))}), var)
    with pytest.raises(DataError, match="fixed-size list") as exc:
        preference_tensor(var, np.array([1]))
    assert str(var) in str(exc.value)


def test_title_matrix(tmp_path: Path):
    path = tmp_path / "item_embeddings.parquet"
    pq.write_table(pa.table({"item_id": pa.array([9, 5, 11, 3], pa.int64()),
                             "embedding": fixed_list([[9, 9, 9], [5, 5, 5], [11, 11, 11], [3, 3, 3]], 3)}), path)
    index = ItemIndex(np.array([7, 3, 9, 5]))  # dense 1..4 = items 3, 5, 7, 9; item 11 is not in the catalogue
    mat, missing = title_matrix(path, index)
    assert mat.shape == (5, 3) and mat.dtype == np.float32
    assert mat[:, 0].tolist() == [0, 3, 5, 0, 9]  # row 0 padding, item 7 has no vector
    assert missing == 1
    _, missing_all = title_matrix(path, ItemIndex(np.array([1, 2])))
    assert missing_all == 2


# -- sampled negatives ---------------------------------------------------------------------------------------


def test_sampled_negatives_avoid_every_interacted_item():
    split, index = tiny_split()
    feats = Features(split, index)
    N, U = feats.num_items, split.num_users
    neg = sampled_negatives(feats, 100, seed=0)
    assert neg.shape == (U, 100)
    assert neg.min() >= 1 and neg.max() <= N
    for u in range(U):
        seen = set(index.encode(split.items[split.offsets[u]:split.offsets[u + 1]]).tolist())
        assert seen.isdisjoint(neg[u].tolist()), u
    # reproducible with the same seed, different with another
    assert np.array_equal(sampled_negatives(feats, 100, seed=0), neg)
    assert not np.array_equal(sampled_negatives(feats, 100, seed=1), neg)
    assert sampled_negatives(feats, 7, seed=0).shape == (U, 7)
    # the never-interacted catalogue items (110, 111) are drawn
    assert {int(i) for i in index.encode(np.array([110, 111]))} <= set(neg.ravel().tolist())


def test_sampled_negatives_with_one_unseen_item_and_with_none():
    rows = [(1, i, i) for i in range(1, 6)] + [(2, 1, 0), (2, 2, 1), (2, 3, 2)]
    table = pa.table({name: pa.array([r[k] for r in rows], pa.int64())
                      for k, name in enumerate(("user_id", "item_id", "timestamp"))})
    split = LeaveOneOutSplit.from_interactions(table)
    feats = Features(split, ItemIndex(np.arange(1, 7)))  # user 1 saw items 1..5 of 6
    neg = sampled_negatives(feats, 100, seed=0)
    assert (neg[0] == 6).all()
    assert set(neg[1].tolist()) <= {4, 5, 6}
    # user 1 saw all five: no negative (padding index 0, scored -inf), the other user still gets real ones
    neg = sampled_negatives(Features(split, ItemIndex(np.arange(1, 6))), 100)
    assert (neg[0] == 0).all() and set(neg[1].tolist()) <= {4, 5}
