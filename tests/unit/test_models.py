"""Unit tests of lane_ray.models on tiny synthetic data (CPU, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lane_ray.errors import DataError
from lane_ray.models import BACKBONES, ModelConfig, SequentialRecommender, load_checkpoint, save_checkpoint
from lane_ray.models.alignment import PreferenceAlignment
from lane_ray.models.layers import ItemEmbedder

N, U, L, D, H, M = 30, 40, 8, 8, 16, 4  # items, users, window, title/pref width, hidden, preference slots


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sequences(seed: int = 0) -> torch.Tensor:
    """[U, L + 1] left-padded train prefixes where item i is usually followed by i + 1 (10% random noise)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, N + 1, (U,), generator=g)
    seq = (start[:, None] + torch.arange(L + 1)[None] - 1) % N + 1
    noise = torch.rand(U, L + 1, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(1, N + 1, (U, L + 1), generator=g), seq)
    lens = torch.randint(3, L + 2, (U,), generator=g)
    seq[torch.arange(L + 1)[None] < (L + 1 - lens)[:, None]] = 0
    return seq


def titles(seed: int = 1) -> torch.Tensor:
    t = torch.randn(N + 1, D, generator=torch.Generator().manual_seed(seed))
    t[0] = 0
    return t


def make(backbone: str = "sasrec", item_mode: str = "id", seed: int = 0, **kw) -> SequentialRecommender:
    torch.manual_seed(seed)
    arch = dict(hidden=H, layers=1, dropout=0.1, max_len=L, title_dim=D, pref_dim=D)
    arch.update(kw)
    cfg = ModelConfig(num_items=N, backbone=backbone, item_mode=item_mode, **arch)  # type: ignore[arg-type]
    return SequentialRecommender(cfg, titles() if item_mode == "title" else None)


def preferences(B: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, M, D] preference vectors and a mask: row 0 all present, row 1 slots 0 and 2, row 2 none, rest all."""
    prefs = torch.randn(B, M, D, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1] = torch.tensor([True, False, True, False])
    mask[2] = False
    return prefs, mask


def histories(B: int = 5, seed: int = 3) -> torch.Tensor:
    h = torch.randint(1, N + 1, (B, L), generator=torch.Generator().manual_seed(seed))
    h[0, :5] = 0  # padded rows
    h[2, :L - 1] = 0  # a single item
    return h


def train_losses(model: SequentialRecommender, items: torch.Tensor, steps: int, loss_type: str = "ce",
                 prefs: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    out = []
    for _ in range(steps):
        loss = model.loss(items, prefs, mask, loss_type)  # type: ignore[arg-type]
        assert loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


# -- training smoke tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["ce", "bce"])
@pytest.mark.parametrize("item_mode", ["id", "title"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_reduces_loss(backbone, item_mode, loss_type):
    model = make(backbone, item_mode)
    losses = train_losses(model, sequences(), 30, loss_type)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5  # average out BERT4Rec masking / DiffuRec noise
    assert last < 0.92 * first, (first, last)


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("item_mode", ["id", "title"])
@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "bert4rec"])
def test_sampled_loss_on_the_batch_table_equals_the_full_table(backbone, item_mode, align):
    """bce computes the vectors of the batch's items only: the same loss and gradients as with the whole table."""
    import torch.nn.functional as F

    model = make(backbone, item_mode, align=align).eval()  # no dropout: the RNG draws only the negatives
    items = sequences()
    prefs, mask = preferences(U) if align else (None, None)
    torch.manual_seed(5)
    fast = model.loss(items, prefs, mask, "bce")
    fast.backward()
    g_fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(5)  # the reference: whole table, the same negatives
    inputs, targets = items[:, :-1], items[:, 1:].masked_fill(items[:, :-1] == 0, 0)
    sel = targets > 0
    tgt = targets[sel]
    neg = torch.randint(1, N + 1, tgt.shape)
    clash = neg == tgt
    neg[clash] = torch.randint(1, N + 1, (int(clash.sum()),))
    table = model.items.table()
    states, _ = model.encode(inputs, prefs, mask, table)
    rep = model.backbone.head(states[sel], table, tgt)
    pos, negl = (rep * table[tgt]).sum(-1), (rep * table[neg]).sum(-1)
    ref = F.binary_cross_entropy_with_logits(torch.cat([pos, negl]), torch.cat([torch.ones_like(pos),
                                                                                 torch.zeros_like(negl)]))
    ref.backward()
    assert torch.allclose(fast, ref, atol=1e-6)
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_fast[k], p.grad, atol=1e-6), k


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_with_alignment_reduces_loss(backbone):
    model = make(backbone, "title", align=True)
    prefs, mask = preferences(U)
    losses = train_losses(model, sequences(), 30, "ce", prefs, mask)
    assert sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5


def test_training_keeps_padding_row_zero_and_frozen_titles_fixed():
    model = make("sasrec", "id")
    train_losses(model, sequences(), 3)
    assert torch.equal(model.items.table()[0], torch.zeros(H))

    frozen = make("sasrec", "title", finetune_titles=False)
    assert "items.titles" not in dict(frozen.named_parameters())
    assert "items.titles" in dict(frozen.named_buffers())
    train_losses(frozen, sequences(), 3)
    assert torch.equal(frozen.items.titles, titles())
    assert torch.equal(frozen.items.table()[0], torch.zeros(H))

    tuned = make("sasrec", "title", finetune_titles=True)
    assert isinstance(tuned.items.titles, torch.nn.Parameter)
    train_losses(tuned, sequences(), 3)
    assert not torch.equal(tuned.items.titles.detach(), titles())


# -- scoring -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("item_mode", ["id", "title"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_full_scores_and_score_agree(backbone, item_mode, align):
    model = make(backbone, item_mode, align=align).eval()
    hist = histories()
    prefs, mask = preferences(len(hist)) if align else (None, None)
    cand = torch.randint(1, N + 1, (len(hist), 7), generator=torch.Generator().manual_seed(4))
    cand[:, 0] = cand[:, 1]  # a repeated candidate
    with torch.no_grad():
        full = model.full_scores(hist, prefs, mask)
        again = model.full_scores(hist, prefs, mask)
        part = model.score(hist, cand, prefs, mask)
    assert full.shape == (len(hist), N + 1)
    assert torch.isinf(full[:, 0]).all() and (full[:, 0] < 0).all()
    assert torch.isfinite(full[:, 1:]).all()
    assert torch.equal(full, again)  # eval mode is deterministic (DiffuRec: fixed-seed start noise)
    assert part.shape == cand.shape
    assert torch.allclose(part, full.gather(1, cand), atol=1e-5)
    assert torch.equal(part[:, 0], part[:, 1])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_history_longer_than_window_uses_newest_items(backbone):
    model = make(backbone).eval()
    long = torch.randint(1, N + 1, (3, L + 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(model.full_scores(long), model.full_scores(long[:, -L:]), atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_user_vectors_shape(backbone):
    model = make(backbone).eval()
    with torch.no_grad():
        rep, w = model.user_vectors(histories())
    assert rep.shape == (5, H) and torch.isfinite(rep).all()
    assert w is None


def test_bert4rec_has_mask_token_and_others_do_not():
    assert make("bert4rec").items.mask_token is not None
    assert make("bert4rec").mask_index == N + 1
    for backbone in ("sasrec", "gru4rec", "diffurec"):
        assert make(backbone).items.mask_token is None


# -- preference alignment ------------------------------------------------------------------------------------


def test_alignment_layer_weights_and_users_without_preferences():
    torch.manual_seed(0)
    layer = PreferenceAlignment(H, D, heads=2, dropout=0.0).eval()
    states = torch.randn(3, 5, H)
    prefs, mask = preferences(3)
    with torch.no_grad():
        out, w = layer(states, prefs, mask)
        out_all, w_all = layer(states, prefs, None)
        ref_all, ref_w_all = layer(states, prefs, torch.ones(3, M, dtype=torch.bool))
    assert out.shape == (3, 5, H) and w.shape == (3, 5, M)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w >= 0).all()
    assert torch.allclose(w[0].sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(w[1].sum(-1), torch.ones(5), atol=1e-6)
    assert torch.equal(w[1][:, [1, 3]], torch.zeros(5, 2))  # masked slots get no weight
    assert torch.equal(w[2], torch.zeros(5, M))  # no preferences at all
    # no preferences: the attention term is dropped, only LN / FFN of the residual path remain
    with torch.no_grad():
        h = layer.ln1(states[2])
        expected = layer.ln2(h + layer.ffn(h))
    assert torch.allclose(out[2], expected, atol=1e-5)
    # mask=None means every preference is present
    assert torch.allclose(out_all, ref_all) and torch.allclose(w_all, ref_w_all)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_user_vectors_alignment_weights(backbone):
    model = make(backbone, "title", align=True, align_heads=2).eval()
    hist = histories()
    prefs, mask = preferences(len(hist))
    with torch.no_grad():
        rep, w = model.user_vectors(hist, prefs, mask)
        full = model.full_scores(hist, prefs, mask)
    assert rep.shape == (len(hist), H) and torch.isfinite(rep).all()
    assert w is not None and w.shape == (len(hist), M)
    assert (w >= 0).all()
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    present = mask.any(1)
    assert torch.allclose(w[present].sum(1), torch.ones(int(present.sum())), atol=1e-6)
    assert torch.equal(w[2], torch.zeros(M))  # row 2 has no preferences
    assert torch.isfinite(full[:, 1:]).all()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_scores_respond_to_present_preferences_only(backbone):
    model = make(backbone, "title", align=True).eval()
    hist = histories()
    prefs, mask = preferences(len(hist))
    other = prefs + torch.randn(prefs.shape, generator=torch.Generator().manual_seed(9))
    masked_only = torch.where(mask.unsqueeze(-1), prefs, other)  # only absent slots changed
    with torch.no_grad():
        base = model.full_scores(hist, prefs, mask)
        changed = model.full_scores(hist, other, mask)
        same = model.full_scores(hist, masked_only, mask)
    diff = (base[:, 1:] - changed[:, 1:]).abs().amax(1)
    assert (diff[mask.any(1)] > 1e-4).all()  # every user with preferences is affected
    assert diff[2] == 0  # the user without preferences is not
    assert torch.allclose(base, same, atol=1e-6)  # masked slots are ignored


def test_model_without_alignment_ignores_preferences_and_alignment_requires_them():
    plain = make("sasrec", "title", align=False).eval()
    hist = histories()
    prefs, mask = preferences(len(hist))
    with torch.no_grad():
        assert torch.equal(plain.full_scores(hist), plain.full_scores(hist, prefs, mask))
        assert torch.isfinite(plain.loss(sequences()))
    assert plain.align is None
    aligned = make("sasrec", "title", align=True).eval()
    with pytest.raises(ValueError, match="prefs"):
        aligned.full_scores(hist)


# -- item embedder -------------------------------------------------------------------------------------------


def test_item_embedder_tables():
    torch.manual_seed(0)
    emb = ItemEmbedder(N, H, "id")
    assert emb.table().shape == (N + 1, H)
    assert torch.equal(emb.table()[0], torch.zeros(H))
    t = titles()
    emb = ItemEmbedder(N, H, "title", title_dim=D, titles=t)
    with torch.no_grad():
        table = emb.table()
        assert torch.equal(table[0], torch.zeros(H))
        assert torch.allclose(table[1:], emb.proj(t[1:]))
    emb = ItemEmbedder(N, H, "id", mask_token=True)
    idx = torch.tensor([[0, 3, N + 1]])
    with torch.no_grad():
        v = emb.lookup(idx)
    assert v.shape == (1, 3, H)
    assert torch.equal(v[0, 2], emb.mask_token.detach())
    assert torch.equal(v[0, 1], emb.table()[3].detach())
    with pytest.raises(ValueError, match="shape"):
        ItemEmbedder(N, H, "title", title_dim=D, titles=torch.zeros(N, D))


# -- checkpoints ---------------------------------------------------------------------------------------------


CHECKPOINT_CASES = [(b, "id", False, False) for b in BACKBONES] + [
    (b, "title", f, False) for b in BACKBONES for f in (False, True)] + [("sasrec", "title", False, True),
                                                                        ("bert4rec", "title", True, True)]


@pytest.mark.parametrize(("backbone", "item_mode", "finetune", "align"), CHECKPOINT_CASES)
def test_checkpoint_round_trip(tmp_path: Path, backbone, item_mode, finetune, align):
    model = make(backbone, item_mode, finetune_titles=finetune, align=align)
    prefs, mask = preferences(U)
    train_losses(model, sequences(), 2, "ce", *((prefs, mask) if align else (None, None)))  # move off the init
    model.eval()
    hist = histories()
    hp, hm = (prefs[:len(hist)], mask[:len(hist)]) if align else (None, None)
    with torch.no_grad():
        expected = model.full_scores(hist, hp, hm)
    path = save_checkpoint(model, tmp_path / "ckpt", meta={"epoch": 3, "variant": item_mode})
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    loaded, meta = load_checkpoint(path)
    assert meta == {"epoch": 3, "variant": item_mode}
    assert loaded.cfg == model.cfg
    assert not loaded.training
    with torch.no_grad():
        got = loaded.full_scores(hist, hp, hm)
    assert torch.equal(got, expected)
    if item_mode == "title":  # titles (trained or frozen) come back from the weights, not from the constructor
        assert torch.equal(loaded.items.titles.detach(), model.items.titles.detach())
        assert isinstance(loaded.items.titles, torch.nn.Parameter) == finetune


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_checkpoint_missing_file(tmp_path: Path, missing):
    path = save_checkpoint(make(), tmp_path / "ckpt")
    (path / missing).unlink()
    with pytest.raises(DataError, match="missing") as exc:
        load_checkpoint(path)
    assert str(path / missing) in str(exc.value)
    with pytest.raises(DataError, match="missing"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"format": "lane-ray-recommender/1"}),  # no "model"
    json.dumps({"model": {"num_items": N, "colour": "red"}}),  # unknown field
    json.dumps({"model": {"num_items": N, "backbone": "transformer-xl"}}),  # invalid value
    json.dumps([1, 2]),
    "null",
])
def test_checkpoint_corrupt_config(tmp_path: Path, content):
    path = save_checkpoint(make(), tmp_path / "ckpt")
    (path / "config.json").write_text(content)
    with pytest.raises(DataError, match="not a lane-ray checkpoint config") as exc:
        load_checkpoint(path)
    assert str(path / "config.json") in str(exc.value)


# -- config --------------------------------------------------------------------------------------------------


def test_model_config_validation():
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(num_items=5, backbone="lstm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(num_items=5, hidden=10, heads=3)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(num_items=5, hidden=10, align_heads=4)
    with pytest.raises(ValueError, match="item_mode"):
        ModelConfig(num_items=5, item_mode="image")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_items"):
        ModelConfig(num_items=0)
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({"num_items": 5, "colour": "red"})
    cfg = ModelConfig(num_items=5, backbone="diffurec", hidden=8, heads=2, align=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_sparse_item_table_trains_with_sparse_adam(backbone):
    from lane_ray.train.loop import make_optimizer

    model = make(backbone, "id", sparse_items=True)
    opt = make_optimizer(model, 1e-2)
    items = sequences()
    model.train()
    losses = []
    for _ in range(30):
        loss = model.loss(items, loss_type="bce")
        opt.zero_grad()
        loss.backward()
        assert model.items.table_.weight.grad.is_sparse  # only the rows the batch touched
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.92 * sum(losses[:5])
    assert torch.count_nonzero(model.items.table_.weight[0]) == 0  # padding row untouched
    state = opt.state_dict()
    fresh = make_optimizer(make(backbone, "id", sparse_items=True), 1e-2)
    fresh.load_state_dict(state)  # a resumed run restores both parts
    with pytest.raises(ValueError, match="loss bce only"):
        model.loss(items, loss_type="ce")
    with pytest.raises(ValueError, match="weight decay"):
        make_optimizer(model, 1e-2, weight_decay=0.1)
    with pytest.raises(ValueError, match="causal backbone"):
        make("bert4rec", "id", sparse_items=True)


def test_sparse_items_config_names_what_it_needs():
    from lane_ray.config import load_config
    from lane_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="sparse_items needs loss bce, num_workers 1"):
        load_config(None, ["train.sparse_items=true", "train.num_workers=2"])
    assert load_config(None, ["train.sparse_items=true", "train.loss=bce"]).train.sparse_items
