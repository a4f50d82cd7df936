"""What training needs from a run directory, as NumPy arrays: the leave-one-out split, the dense item index, title
vectors ``[N + 1, D]`` and preference vectors ``[U, m, D]`` (+ presence mask), aligned to the split's users."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from lane_ray.data.split import ItemIndex, LeaveOneOutSplit, pad_left
from lane_ray.errors import DataError
from lane_ray.io import read_parquet


@dataclass
class Features:
    split: LeaveOneOutSplit
    index: ItemIndex
    titles: np.ndarray | None = None  # [N + 1, D] float32, row 0 zero
    prefs: np.ndarray | None = None  # [U, m, D] float32
    pref_mask: np.ndarray | None = None  # [U, m] bool
    report: dict[str, int] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.index)

    def shuffled(self, seed: int = 0) -> Features:
        """The ``lane-shuffled`` control: every user gets another user's preferences (a random cyclic derangement,
        so nobody keeps their own)."""
        if self.prefs is None or self.pref_mask is None:
            raise DataError("no preferences to shuffle")
        U = self.prefs.shape[0]
        order = np.random.default_rng(seed).permutation(U)
        src = np.empty(U, dtype=np.int64)
        src[order] = np.roll(order, -1) if U > 1 else order
        return replace(self, prefs=self.prefs[src], pref_mask=self.pref_mask[src])

    def train_items(self, rows: np.ndarray, max_len: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """[B, max_len + 1] left-padded train prefixes (dense indices) of split rows ``rows``.

        A prefix longer than the window keeps its newest items, or, with ``rng``, a window ending at a uniformly
        drawn position (so over the epochs every part of a long history is trained on, at the cost of one window).
        """
        seqs = []
        for i in rows:
            p = self.split.train_prefix(int(i))
            if rng is not None and len(p) > max_len + 1:
                end = int(rng.integers(max_len + 1, len(p) + 1))
                p = p[end - max_len - 1:end]
            seqs.append(self.index.encode(p))
        return pad_left(seqs, max_len + 1)

    def histories(self, rows: np.ndarray, stage: str, max_len: int) -> np.ndarray:
        """[B, max_len] left-padded model input for predicting ``stage``'s target (valid or test)."""
        return pad_left([self.index.encode(self.split.history(int(i), stage)) for i in rows], max_len)  # type: ignore[arg-type]


def title_matrix(path: str | Path, index: ItemIndex) -> tuple[np.ndarray, int]:
    """[N + 1, D] title vectors in index order (row 0 zero) from ``item_embeddings.parquet``; returns the matrix and
    the number of catalogue items without a vector (they keep a zero row)."""
    t = read_parquet(path, ["item_id", "embedding"])
    ids = t["item_id"].to_numpy()
    emb = t["embedding"].combine_chunks()
    if not isinstance(emb.type, pa.FixedSizeListType):
        raise DataError("embedding column is not a fixed-size list", file=path, field="embedding")
    dim = emb.type.list_size
    vecs = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    pos = np.searchsorted(index.item_ids, ids)
    pos_c = np.minimum(pos, len(index) - 1)
    known = index.item_ids[pos_c] == ids
    out = np.zeros((len(index) + 1, dim), dtype=np.float32)
    out[pos_c[known] + 1] = vecs[known]
    have = np.zeros(len(index) + 1, dtype=bool)
    have[pos_c[known] + 1] = True
    return out, int((~have[1:]).sum())


def preference_tensor(path: str | Path, user_ids: np.ndarray, m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[U, m, D] preference vectors and [U, m] presence mask from ``preference_embeddings.parquet`` (keys
    ``user_id``, ``slot``), rows in the order of ``user_ids``; users or slots without a vector are masked."""
    t = read_parquet(path, ["user_id", "slot", "embedding"])
    users = t["user_id"].to_numpy()
    slots = t["slot"].to_numpy().astype(np.int64)
    emb = t["embedding"].combine_chunks()
    if not isinstance(emb.type, pa.FixedSizeListType):
        raise DataError("embedding column is not a fixed-size list", file=path, field="embedding")
    dim = emb.type.list_size
    vecs = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    m = int(m or (slots.max() + 1 if slots.size else 1))
    if slots.size and slots.min() < 0:
        raise DataError("negative preference slot", file=path, field="slot")
    row = np.searchsorted(user_ids, users)
    row_c = np.minimum(row, len(user_ids) - 1)
    ok = (user_ids[row_c] == users) & (slots < m)
    prefs = np.zeros((len(user_ids), m, dim), dtype=np.float32)
    mask = np.zeros((len(user_ids), m), dtype=bool)
    prefs[row_c[ok], slots[ok]] = vecs[ok]
    mask[row_c[ok], slots[ok]] = True
    return prefs, mask


def load_features(run_dir: str | Path, titles: bool = True, preferences: bool = True, m: int | None = None,
                  interactions: pa.Table | None = None, catalog: pa.Table | None = None) -> Features:
    """Features of a run directory (``data/``, ``item_embeddings.parquet``, ``preference_embeddings.parquet``)."""
    from lane_ray.data import read_prepared

    run_dir = Path(run_dir)
    if interactions is None or catalog is None:
        prepared = read_prepared(run_dir)
        interactions, catalog = prepared.interactions, prepared.catalog
    split = LeaveOneOutSplit.from_interactions(interactions)
    index = ItemIndex(np.concatenate([catalog["item_id"].to_numpy(), split.items]))
    feats = Features(split, index)
    if titles:
        path = run_dir / "item_embeddings.parquet"
        if not path.exists():
            raise DataError("no title embeddings; run `lane embed` first", file=path)
        feats.titles, feats.report["items_without_title_vector"] = title_matrix(path, index)
    if preferences:
        path = run_dir / "preference_embeddings.parquet"
        if not path.exists():
            raise DataError("no preference embeddings; run `lane preferences` first", file=path)
        feats.prefs, feats.pref_mask = preference_tensor(path, split.user_ids, m)
        feats.report["users_without_preferences"] = int((~feats.pref_mask.any(1)).sum())
    return feats
