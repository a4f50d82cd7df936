"""Leave-one-out split, the no-leakage guard and padded sequence batches.

For each user (interactions ordered by time, ties by file order): the last item is the test target, the
second-to-last the validation target, the rest is the *train prefix*. Anything shown to an LLM or used as a
training target comes from the train prefix only; :meth:`LeaveOneOutSplit.assert_no_leakage` checks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from lane_ray.errors import LaneError

Stage = Literal["train", "valid", "test"]


class LeakageError(LaneError):
    """A validation or test interaction reached a train prefix."""


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Per-user sequences in CSR layout: user ``u`` (row ``i``) owns ``items[offsets[i]:offsets[i+1]]``."""

    user_ids: np.ndarray  # [U] int64, ascending
    offsets: np.ndarray  # [U + 1] int64
    items: np.ndarray  # [N] int64 item ids, user-major, time-ordered
    timestamps: np.ndarray  # [N] int64

    @classmethod
    def from_interactions(cls, interactions: pa.Table) -> LeaveOneOutSplit:
        """Build the split from an ``interactions`` table; rows are (re)ordered stably by user and time."""
        users = interactions["user_id"].to_numpy()
        ts = interactions["timestamp"].to_numpy()
        items = interactions["item_id"].to_numpy()
        order = np.lexsort((np.arange(users.size), ts, users))  # stable: file order breaks time ties
        users, ts, items = users[order], ts[order], items[order]
        uniq, starts, counts = np.unique(users, return_index=True, return_counts=True)
        if counts.size and counts.min() < 3:
            u = int(uniq[np.argmin(counts)])
            raise LeakageError(f"user {u} has {int(counts.min())} interactions; leave-one-out needs at least 3")
        offsets = np.append(starts, users.size).astype(np.int64)
        split = cls(uniq.astype(np.int64), offsets, items.astype(np.int64), ts.astype(np.int64))
        split.assert_no_leakage()
        return split

    @property
    def num_users(self) -> int:
        return int(self.user_ids.size)

    def train_prefix(self, i: int) -> np.ndarray:
        """Items of user row ``i`` before its validation target (the only history an LLM may see)."""
        return self.items[self.offsets[i] : self.offsets[i + 1] - 2]

    def history(self, i: int, stage: Stage) -> np.ndarray:
        """Model input for predicting ``stage``'s target: train prefix (valid) or prefix + valid item (test).
        For ``train`` it is the train prefix itself (next-item targets are taken inside it)."""
        end = self.offsets[i + 1] - (1 if stage == "test" else 2)
        return self.items[self.offsets[i] : end]

    def targets(self, stage: Literal["valid", "test"]) -> np.ndarray:
        """[U] the validation or test item of every user."""
        back = 2 if stage == "valid" else 1
        return self.items[self.offsets[1:] - back]

    def train_lengths(self) -> np.ndarray:
        return np.diff(self.offsets) - 2

    def assert_no_leakage(self) -> None:
        """Check that every train prefix ends strictly before the validation position and no later in time,
        and that the validation interaction precedes the test one."""
        ends = self.offsets[1:]
        valid_pos, test_pos = ends - 2, ends - 1
        if (valid_pos - self.offsets[:-1] < 1).any():
            raise LeakageError("a user has an empty train prefix")
        last_train_ts = self.timestamps[valid_pos - 1]
        if (last_train_ts > self.timestamps[valid_pos]).any() or (
            self.timestamps[valid_pos] > self.timestamps[test_pos]
        ).any():
            bad = int(np.flatnonzero((last_train_ts > self.timestamps[valid_pos])
                                     | (self.timestamps[valid_pos] > self.timestamps[test_pos]))[0])
            raise LeakageError(f"user {int(self.user_ids[bad])}: a held-out interaction precedes a train one")

    def check_history(self, i: int, history: np.ndarray) -> None:
        """Raise :class:`LeakageError` unless ``history`` is a suffix of user row ``i``'s train prefix
        (what a prompt builder may show: recent train items only)."""
        prefix = self.train_prefix(i)
        n = len(history)
        if n > len(prefix) or not np.array_equal(prefix[len(prefix) - n :], np.asarray(history)):
            raise LeakageError(f"user {int(self.user_ids[i])}: history is not a suffix of the train prefix")


class ItemIndex:
    """Dense item indices for models: catalogue item ids -> 1..N, with 0 reserved for padding."""

    def __init__(self, item_ids: np.ndarray) -> None:
        ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        self.item_ids = ids  # index k (1-based) -> ids[k - 1]

    def __len__(self) -> int:
        return int(self.item_ids.size)

    def encode(self, item_ids: np.ndarray) -> np.ndarray:
        """Map item ids to indices 1..N; an id outside the catalogue raises KeyError."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, item_ids)
        pos_c = np.minimum(pos, self.item_ids.size - 1)
        ok = self.item_ids[pos_c] == item_ids
        if not ok.all():
            raise KeyError(f"item id {int(item_ids[~ok][0])} is not in the catalogue")
        return pos_c + 1

    def decode(self, index: np.ndarray) -> np.ndarray:
        return self.item_ids[np.asarray(index) - 1]


def pad_left(seqs: list[np.ndarray], max_len: int, pad: int = 0) -> np.ndarray:
    """[B, max_len] int64: each sequence right-aligned (most recent last), truncated to its newest items."""
    out = np.full((len(seqs), max_len), pad, dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[r, max_len - len(s) :] = s
    return out


@dataclass
class SequenceBatch:
    """A padded batch. ``inputs`` [B, L] dense item indices (0 = pad); ``targets`` [B, L] next-item
    indices for ``train`` (0 where padded), [B] for ``valid``/``test``; ``user_ids`` [B]."""

    user_ids: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray


def sequence_batches(
    split: LeaveOneOutSplit,
    index: ItemIndex,
    stage: Stage,
    batch_size: int,
    max_len: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[SequenceBatch]:
    """Padded batches over all users. ``train`` batches use only train prefixes (input ``prefix[:-1]``,
    target ``prefix[1:]``), so no validation or test item can appear in them."""
    rows = np.arange(split.num_users)
    if shuffle:
        np.random.default_rng(seed).shuffle(rows)
    targets_all = None if stage == "train" else index.encode(split.targets(stage))
    for start in range(0, rows.size, batch_size):
        sel = rows[start : start + batch_size]
        if stage == "train":
            prefixes = [index.encode(split.train_prefix(i)) for i in sel]
            inputs = pad_left([p[:-1] for p in prefixes], max_len)
            targets = pad_left([p[1:] for p in prefixes], max_len)
        else:
            inputs = pad_left([index.encode(split.history(i, stage)) for i in sel], max_len)
            targets = targets_all[sel]  # type: ignore[index]
        yield SequenceBatch(split.user_ids[sel], inputs, targets)
