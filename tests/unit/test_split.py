from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lane_ray.data.schemas import interactions_table
from lane_ray.data.split import ItemIndex, LeakageError, LeaveOneOutSplit, pad_left, sequence_batches


def table(rows):
    return interactions_table(*(pa.array([r[k] for r in rows], pa.int64()) for k in range(3)))


ROWS = [(2, 5, 10), (1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4), (2, 6, 11), (2, 7, 12), (2, 8, 12)]


def test_leave_one_out_targets_and_prefixes():
    s = LeaveOneOutSplit.from_interactions(table(ROWS))
    assert s.user_ids.tolist() == [1, 2]
    assert s.targets("test").tolist() == [4, 8]  # (2, 7, 12) and (2, 8, 12) tie: file order decides
    assert s.targets("valid").tolist() == [3, 7]
    assert s.train_prefix(0).tolist() == [1, 2]
    assert s.history(0, "valid").tolist() == [1, 2]
    assert s.history(0, "test").tolist() == [1, 2, 3]
    s.check_history(0, np.array([2]))
    with pytest.raises(LeakageError):
        s.check_history(0, np.array([2, 3]))  # 3 is the validation item


def test_guard_rejects_held_out_before_train():
    s = LeaveOneOutSplit.from_interactions(table(ROWS))
    broken = LeaveOneOutSplit(s.user_ids, s.offsets, s.items, s.timestamps.copy())
    broken.timestamps[2] = 99  # last train interaction of user 1 now after its validation one
    with pytest.raises(LeakageError, match="user 1"):
        broken.assert_no_leakage()
    with pytest.raises(LeakageError, match="at least 3"):
        LeaveOneOutSplit.from_interactions(table([(1, 1, 1), (1, 2, 2)]))


def test_pad_left_keeps_most_recent():
    out = pad_left([np.array([1, 2, 3, 4]), np.array([5]), np.array([], dtype=np.int64)], 3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 0]]


def test_item_index_roundtrip_and_unknown():
    idx = ItemIndex(np.array([30, 10, 20, 10]))
    assert len(idx) == 3
    assert idx.encode(np.array([10, 30])).tolist() == [1, 3]
    assert idx.decode(np.array([1, 3])).tolist() == [10, 30]
    with pytest.raises(KeyError, match="99"):
        idx.encode(np.array([99]))


def test_batches_never_contain_held_out_items_in_train():
    rng = np.random.default_rng(0)
    rows = [(u, int(i), t) for u in range(1, 40) for t, i in enumerate(rng.choice(200, size=rng.integers(3, 30),
                                                                                 replace=False))]
    s = LeaveOneOutSplit.from_interactions(table(rows))
    idx = ItemIndex(s.items)
    held = {(int(u), int(v)) for u, v in zip(s.user_ids, s.targets("valid"), strict=True)} | {
        (int(u), int(v)) for u, v in zip(s.user_ids, s.targets("test"), strict=True)}
    seen = 0
    for b in sequence_batches(s, idx, "train", batch_size=8, max_len=10, shuffle=True, seed=1):
        assert b.inputs.shape == b.targets.shape == (len(b.user_ids), 10)
        for u, inp, tgt in zip(b.user_ids, b.inputs, b.targets, strict=True):
            for v in idx.decode(np.concatenate([inp[inp > 0], tgt[tgt > 0]])):
                assert (int(u), int(v)) not in held
            # targets are inputs shifted by one
            m = tgt[:-1] > 0
            assert (inp[1:][m] == tgt[:-1][m]).all() and ((inp > 0) == (tgt > 0)).all()
        seen += len(b.user_ids)
    assert seen == s.num_users
    b = next(sequence_batches(s, idx, "test", batch_size=100, max_len=50))
    assert idx.decode(b.targets).tolist() == s.targets("test").tolist()
    assert (idx.decode(b.inputs[0][b.inputs[0] > 0]) == s.history(0, "test")).all()
