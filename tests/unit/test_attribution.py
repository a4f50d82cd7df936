"""Item-level attribution against brute-force recomputation, for every backbone (tiny random models, CPU)."""

from __future__ import annotations

import pytest
import torch

from lane_ray.models import BACKBONES, ModelConfig, SequentialRecommender
from lane_ray.models.attribution import attribute

N, L, D, H, M, C = 30, 8, 8, 16, 4, 5  # items, window, pref width, hidden, preference slots, candidates


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(backbone: str, align: bool = True, seed: int = 0, item_mode: str = "id") -> SequentialRecommender:
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=N, backbone=backbone, item_mode=item_mode, hidden=H, layers=1, dropout=0.1,  # type: ignore[arg-type]
                      max_len=L, title_dim=D, pref_dim=D, align=align)
    titles = torch.randn(N + 1, D) if item_mode == "title" else None
    model = SequentialRecommender(cfg, titles)
    with torch.no_grad():  # a trained-looking alignment: random init leaves the preference path tiny
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def batch(B: int = 5, width: int = L, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, N + 1, (B, width), generator=g)
    hist[0, :width - 5] = 0  # padded
    hist[2, :width - 1] = 0  # a single item
    hist[3, -3] = hist[3, -1]  # a repeated item
    items = torch.randint(1, N + 1, (B, C), generator=g)
    prefs = torch.randn(B, M, D, generator=g)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1] = torch.tensor([True, False, True, False])
    mask[2] = False  # no preference at all
    mask[4] = torch.tensor([False, False, True, False])  # a single one
    return hist, items, prefs, mask


@torch.no_grad()
def removal_deltas(model, hist, items, prefs, mask, window):
    """{(b, c): {position: delta}} by scoring every history with one item removed (left-padded again)."""
    base = model.score(hist, items, prefs, mask)
    out = {}
    B, W = hist.shape
    cloze = int(model.backbone.cloze)
    visible = min(W, L) - cloze  # the columns the model reads (BERT4Rec drops the first for its mask token)
    for b in range(B):
        for p in range(W - min(window, visible), W):
            if hist[b, p] == 0:
                continue
            h2 = torch.cat([torch.zeros(1, dtype=hist.dtype), hist[b, :p], hist[b, p + 1:]])[None]
            s2 = model.score(h2, items[b:b + 1], None if prefs is None else prefs[b:b + 1],
                             None if mask is None else mask[b:b + 1])[0]
            for c in range(items.shape[1]):
                out.setdefault((b, c), {})[p] = float(base[b, c] - s2[c])
    return out


def check_history(att, model, hist, items, prefs, mask, window, top):
    deltas = removal_deltas(model, hist, items, prefs, mask, window)
    B = hist.shape[0]
    for b in range(B):
        for c in range(items.shape[1]):
            per_item: dict[int, float] = {}
            for p, d in deltas.get((b, c), {}).items():
                it = int(hist[b, p])
                per_item[it] = max(per_item.get(it, float("-inf")), d)
            want = sorted(per_item.values(), reverse=True)[:top]
            got_idx = att.history_idx[b, c].tolist()
            got = att.history_contrib[b, c].tolist()
            n = len(want)
            assert got[:n] == sorted(got[:n], reverse=True)
            assert got_idx[n:] == [0] * (len(got_idx) - n) and got[n:] == [0.0] * (len(got) - n)
            assert torch.allclose(torch.tensor(got[:n]), torch.tensor(want), rtol=1e-4, atol=1e-4), (b, c, got, want)
            for it, v in zip(got_idx[:n], got[:n], strict=True):  # each listed item carries its own drop
                assert it in per_item and abs(per_item[it] - v) <= 1e-4 * (1 + abs(v))
            assert len(set(got_idx[:n])) == n  # a repeated item is listed once


@pytest.mark.parametrize("backbone", BACKBONES)
@torch.no_grad()
def test_attribution_equals_brute_force(backbone):
    model = make(backbone)
    hist, items, prefs, mask = batch()
    att = attribute(model, hist, items, prefs, mask, history_top=3, history_window=6)
    base = model.score(hist, items, prefs, mask)
    assert torch.allclose(att.score, base, atol=1e-5)
    assert att.pref_contrib.shape == (5, C, M) and att.history_idx.shape == (5, C, 3)
    for k in range(M):
        m2 = mask.clone()
        m2[:, k] = False
        want = (base - model.score(hist, items, prefs, m2)) * mask[:, k:k + 1]
        assert torch.allclose(att.pref_contrib[:, :, k], want, atol=1e-5)
    assert (att.pref_contrib[~mask.unsqueeze(1).expand(-1, C, -1)] == 0).all()  # absent slots: exactly 0
    share = base - model.score(hist, items, prefs, torch.zeros_like(mask))
    assert torch.allclose(att.pref_share, share, atol=1e-5)
    assert (att.pref_share[2] == 0).all() and (att.pref_contrib[2] == 0).all()  # no preference: nothing to carry
    assert att.pref_contrib.abs().max() > 1e-3  # the check is not vacuous
    check_history(att, model, hist, items, prefs, mask, window=6, top=3)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
@torch.no_grad()
def test_history_wider_than_the_model_window_is_exact(backbone):
    model = make(backbone, seed=1)
    hist, items, prefs, mask = batch(width=L + 4, seed=5)
    hist[0] = torch.randint(1, N + 1, (L + 4,))  # a full row: a removal pulls an older item into the window
    att = attribute(model, hist, items, prefs, mask, history_top=2, history_window=L + 4)
    assert torch.allclose(att.score, model.score(hist, items, prefs, mask), atol=1e-5)
    check_history(att, model, hist, items, prefs, mask, window=L + 4, top=2)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_model_without_alignment(backbone):
    model = make(backbone, align=False, item_mode="title")
    hist, items, _, _ = batch()
    att = attribute(model, hist, items, history_top=4, history_window=L)
    assert att.pref_contrib.shape == (5, C, 0) and (att.pref_share == 0).all()
    assert torch.allclose(att.score, model.score(hist, items), atol=1e-5)
    check_history(att, model, hist, items, None, None, window=L, top=4)


def test_small_chunks_and_mode_are_restored(monkeypatch):
    import lane_ray.models.attribution as attribution

    model = make("sasrec", seed=2)
    hist, items, prefs, mask = batch(B=7, seed=9)
    mask[5:] = True
    whole = attribute(model, hist, items, prefs, mask)
    monkeypatch.setattr(attribution, "_TOKENS_PER_CALL", L)  # one user per backbone call
    model.train()
    split = attribute(model, hist, items, prefs, mask)
    assert model.training  # restored
    assert torch.equal(whole.history_idx, split.history_idx)
    assert torch.allclose(whole.history_contrib, split.history_contrib, atol=1e-5)
    none = attribute(model.eval(), hist, items, prefs, mask, history_top=0)
    assert none.history_idx.shape == (7, C, 0)


@torch.no_grad()
def test_user_vectors_equal_aligning_the_whole_sequence():
    # user_vectors aligns the last state only; the layer is position-wise, so this equals aligning every state
    for backbone in BACKBONES:
        model = make(backbone)
        hist, _, prefs, mask = batch()
        states, w = model.encode(model.scoring_inputs(hist), prefs, mask)
        rep, w_last = model.user_vectors(hist, prefs, mask)
        assert torch.allclose(rep, model.backbone.head(states[:, -1], model.items.table()), atol=1e-5)
        assert torch.allclose(w_last, w[:, -1], atol=1e-6)
