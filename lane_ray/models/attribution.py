"""Item-level attribution: why the model scored item i for user u, in the model's own terms.

For a (user, item) pair with score ``s(u, i)`` (the dot product :meth:`SequentialRecommender.score` computes):

* ``pref_contrib[k] = s(u, i) - s(u, i without preference k)``: exact leave-one-out over the preference slots.
  The backbone states do not depend on the preferences, so the backbone runs once and only the alignment layer
  and the head run again: once per slot and once with no preference at all, all in one batch.
* ``pref_share = s(u, i) - s(u, i with no preferences)``: the part of the score the preferences carry (the
  alignment layer's "no preference" path: the states pass through its residual branch alone).
* ``history_contrib``: the history items whose removal lowers ``s(u, i)`` most, with the drop
  ``s(u, i) - s(u, i without that item)``. Removal drops the item from the sequence (the left-padded history is one
  item shorter), so it needs one backbone pass per removed position. A removal changes the user vector, not the
  item vectors, so the ``C`` candidates of a user share those passes; the ``history_window`` most recent items are
  tried.

Pure torch, no I/O. Every backbone works the same way (BERT4Rec's appended mask token and DiffuRec's deterministic
scoring head go through :meth:`SequentialRecommender.scoring_inputs` / :meth:`~SequentialRecommender.user_head`);
a model without alignment gets empty preference tensors and a share of 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lane_ray.models.recommender import SequentialRecommender

# Sequences per backbone call of the history removals times their width: bounds the attention's memory
# ([S, L, L] floats) at about 256k tokens a call, whatever the batch size.
_TOKENS_PER_CALL = 1 << 18


@dataclass(frozen=True)
class Attribution:
    """Attributions of ``C`` candidate items for each of ``B`` users (all on the model's device).

    ``score [B, C]``: s(u, i). ``pref_contrib [B, C, m]``: s(u, i) minus the score with slot k masked out (0 for
    absent slots; ``m = 0`` without alignment). ``pref_share [B, C]``: s(u, i) minus the score with no preference.
    ``history_idx [B, C, h]``: dense indices of the history items whose removal lowers the score most (0 = none,
    e.g. a history shorter than h), ``history_contrib [B, C, h]``: their drops, sorted descending (0 where none).
    A repeated item is listed once, with its largest drop.
    """

    score: torch.Tensor
    pref_contrib: torch.Tensor
    pref_share: torch.Tensor
    history_idx: torch.Tensor
    history_contrib: torch.Tensor


def _pref_variants(mask: torch.Tensor) -> torch.Tensor:
    """[m + 2, B, m] preference masks: as given, without slot k (k = 0..m-1), and with none."""
    B, m = mask.shape
    drop = ~torch.eye(m, dtype=torch.bool, device=mask.device)  # [m, m]: row k masks slot k out
    single = mask.unsqueeze(0) & drop.unsqueeze(1)  # [m, B, m]
    return torch.cat([mask.unsqueeze(0), single, torch.zeros_like(mask).unsqueeze(0)], 0)


def _removed(history: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, P, L] copies of ``history [B, L]``, copy p without column ``positions[p]`` and left-padded by one."""
    B, L = history.shape
    c = torch.arange(L, device=history.device)
    p = positions.view(-1, 1)  # [P, 1]
    src = torch.where(c.unsqueeze(0) <= p, c.unsqueeze(0) - 1, c.unsqueeze(0))  # [P, L]: column c reads src
    out = history[:, src.clamp(min=0)]  # [B, P, L]
    return out.masked_fill((src < 0).unsqueeze(0), 0)


@torch.no_grad()
def attribute(model: SequentialRecommender, history: torch.Tensor, items: torch.Tensor,
              prefs: torch.Tensor | None = None, pref_mask: torch.Tensor | None = None,
              table: torch.Tensor | None = None, history_top: int = 3, history_window: int = 50,
              last: torch.Tensor | None = None) -> Attribution:
    """Attributions of the candidates ``items [B, C]`` (dense indices) after the left-padded ``history [B, L]``.

    ``prefs [B, m, D]`` / ``pref_mask [B, m]`` as for :meth:`SequentialRecommender.score` (required by aligned
    models, ignored otherwise); ``table``: the item table, if the caller has it already. ``history_top`` (h): how
    many history items to return per pair; ``history_window`` (W): removals are tried for the W most recent history
    items only, which costs B * W backbone passes. The window never reaches past what the model reads: the last
    ``max_len`` columns (BERT4Rec: ``max_len - 1`` and never the first column, which its mask token displaces).
    ``last [B, 1, H]``: the history's last backbone state, when the caller has computed it already (a ranker that
    scored the catalogue with it). Runs in eval mode, restoring the model's mode after.
    """
    if history_top < 0 or history_window < 0:
        raise ValueError("history_top and history_window must be >= 0")
    was_training = model.training
    model.eval()
    try:
        return _attribute(model, history, items, prefs, pref_mask, table, history_top, history_window, last)
    finally:
        model.train(was_training)


def _attribute(model: SequentialRecommender, history: torch.Tensor, items: torch.Tensor, prefs: torch.Tensor | None,
               pref_mask: torch.Tensor | None, table: torch.Tensor | None, history_top: int,
               history_window: int, last: torch.Tensor | None) -> Attribution:
    table = model.items.table() if table is None else table
    B, C = items.shape
    # the model reads at most the last max_len columns (BERT4Rec: max_len - 1 and its mask token); one more column
    # is what a removal can pull into that window, so wider histories are cut there without changing a score
    history = history[:, -(model.cfg.max_len + 1):]
    item_vecs = table[items]  # [B, C, H]
    if last is None:  # [B, 1, H], computed once
        last = model.backbone_states(model.scoring_inputs(history), table)[:, -1:]

    aligned = model.align is not None
    if aligned:
        if prefs is None:
            raise ValueError("this model aligns with preferences: pass prefs [B, m, D]")
        m = prefs.shape[1]
        mask = torch.ones(B, m, dtype=torch.bool, device=prefs.device) if pref_mask is None else pref_mask
        variants = _pref_variants(mask)  # [m + 2, B, m]
        V = variants.shape[0]
        rep, _ = model.user_head(last.repeat(V, 1, 1), prefs.repeat(V, 1, 1), variants.reshape(V * B, m), table)
        s = torch.einsum("vbh,bch->vbc", rep.view(V, B, -1), item_vecs)  # [m + 2, B, C]
        score = s[0]
        pref_contrib = (score.unsqueeze(-1) - s[1:m + 1].permute(1, 2, 0)) * mask.unsqueeze(1)  # [B, C, m]
        pref_share = score - s[m + 1]
    else:
        mask = None
        rep, _ = model.user_head(last, None, None, table)
        score = (item_vecs * rep.unsqueeze(1)).sum(-1)
        pref_contrib = score.new_zeros(B, C, 0)
        pref_share = torch.zeros_like(score)

    # removals of items the model does not read change nothing: the window stays inside what it reads
    cloze = int(model.backbone.cloze)
    visible = max(0, min(history.shape[1], model.cfg.max_len) - cloze)
    h_idx, h_contrib = _history(model, history, prefs if aligned else None, mask, table, item_vecs, score,
                                history_top, min(history_window, visible))
    return Attribution(score, pref_contrib, pref_share, h_idx, h_contrib)


def _history(model: SequentialRecommender, history: torch.Tensor, prefs: torch.Tensor | None,
             mask: torch.Tensor | None, table: torch.Tensor, item_vecs: torch.Tensor, score: torch.Tensor,
             top: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` history items (of the ``window`` most recent) whose removal lowers each candidate's score most."""
    B, C = score.shape
    L = history.shape[1]
    W = min(window, L)
    h = min(top, W)
    out_idx = torch.zeros(B, C, h, dtype=torch.long, device=history.device)
    out_val = score.new_zeros(B, C, h)
    if h == 0 or B == 0:
        return out_idx, out_val
    lengths = (history > 0).sum(1)
    delta = score.new_full((B, W, C), float("-inf"))  # [B, W, C]; -inf where no item sits at the position
    positions = torch.arange(L - W, L, device=history.device)  # [W] the most recent columns
    # users sorted by length, cut into chunks of similar width: the all-padding columns of a chunk are dropped
    # (states do not depend on left padding), one column kept so a removal's extra padding has a place
    order = torch.argsort(lengths)
    start = 0
    while start < B:
        n = B - start
        for _ in range(2):  # size the chunk by its longest (last) row; shrinking it only narrows that row
            width = min(L, int(lengths[order[start + n - 1]]) + 1)
            n = max(1, min(n, _TOKENS_PER_CALL // (W * width)))
        rows = order[start:start + n]
        width = min(L, int(lengths[rows[-1]]) + 1)
        hist = history[rows, L - width:]  # [b, width]
        cols = positions - (L - width)  # window columns inside the trimmed history (< 0: outside it)
        inside = cols >= 0
        seqs = _removed(hist, cols[inside])  # [b, w, width]
        b, w = seqs.shape[:2]
        last = model.backbone_states(model.scoring_inputs(seqs.reshape(b * w, width)), table)[:, -1:]
        if prefs is not None:
            rep, _ = model.user_head(last, prefs[rows].repeat_interleave(w, 0), mask[rows].repeat_interleave(w, 0),
                                     table)
        else:
            rep, _ = model.user_head(last, None, None, table)
        s = torch.einsum("bwh,bch->bwc", rep.view(b, w, -1), item_vecs[rows])  # [b, w, C]
        d = score[rows].unsqueeze(1) - s
        real = hist[:, cols[inside]] > 0  # [b, w]
        full = delta.new_full((len(rows), W, C), float("-inf"))
        full[:, inside] = d.masked_fill(~real.unsqueeze(-1), float("-inf"))
        delta[rows] = full
        start += len(rows)
    window_items = history[:, L - W:]  # [B, W]
    same = window_items.unsqueeze(2) == window_items.unsqueeze(1)  # [B, W, W]
    same &= ~torch.eye(W, dtype=torch.bool, device=history.device)
    same &= (window_items > 0).unsqueeze(2)
    if same.any():  # a repeated item counts once: its occurrence with the largest drop (the later on ties)
        di, dj = delta.unsqueeze(2), delta.unsqueeze(1)  # [B, W, 1, C], [B, 1, W, C]
        later = (torch.arange(W, device=history.device).view(1, W) > torch.arange(W, device=history.device)
                 .view(W, 1)).view(1, W, W, 1)
        beaten = same.unsqueeze(-1) & ((dj > di) | ((dj == di) & later))
        delta = delta.masked_fill(beaten.any(2), float("-inf"))
    val, pos = delta.topk(h, dim=1)  # [B, h, C]
    val, pos = val.transpose(1, 2), pos.transpose(1, 2)  # [B, C, h]
    found = torch.isfinite(val)
    out_idx = torch.where(found, window_items.gather(1, pos.reshape(B, -1)).view(B, C, h), out_idx)
    out_val = torch.where(found, val, out_val)
    return out_idx, out_val
