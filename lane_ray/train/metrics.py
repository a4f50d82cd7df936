"""Ranking metrics from 0-based ranks of the target, vectorised over users.

A target's rank counts the items scored strictly higher plus the *other* items scored equally (ties are broken
against the target, so a model that scores everything the same ranks every target last, never first).
"""

from __future__ import annotations

import numpy as np

KS = (5, 10, 20)


def target_ranks(scores: np.ndarray, target_scores: np.ndarray) -> np.ndarray:
    """[B] 0-based ranks given all candidate scores ``[B, C]`` (including the target) and the target's ``[B]``."""
    t = target_scores[:, None]
    return (scores > t).sum(1) + (scores == t).sum(1) - 1


def rank_metrics(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Mean NDCG@k, HR@k and MRR@k over users from their 0-based target ranks (one relevant item per user)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if ranks.size else 0.0
        out[f"hr@{k}"] = float(hit.mean()) if ranks.size else 0.0
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean()) if ranks.size else 0.0
    return out
