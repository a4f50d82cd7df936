"""The recommender: item embedder -> backbone -> (LANE alignment) -> head, scored by dot product.

Contract (all tensors on the model's device; item indices are dense, 1..N, 0 = padding):

* :meth:`encode` ``inputs [B, L]`` (+ preferences ``[B, m, D]``, mask ``[B, m]``) -> states ``[B, L, H]`` and the
  alignment weights ``[B, L, m]`` (``None`` without alignment);
* :meth:`loss` on a training batch ``items [B, L + 1]`` (left-padded train prefixes, newest last);
* :meth:`score` of candidates ``[B, C]`` and :meth:`full_scores` ``[B, N + 1]`` (column 0 = -inf) after a history.
* scoring in two steps that :mod:`lane_ray.models.attribution` reuses: :meth:`backbone_states` of
  :meth:`scoring_inputs` (independent of the preferences), then :meth:`user_head` on the last state (alignment +
  head) -> the user representation ``[B, H]``; :meth:`user_vectors` chains them.

A checkpoint is a directory with ``config.json`` (the :class:`ModelConfig` plus free metadata) and
``model.safetensors``; :func:`load_checkpoint` rebuilds the model from it without any training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lane_ray.models.alignment import PreferenceAlignment
from lane_ray.models.backbones import build_backbone
from lane_ray.models.config import ModelConfig
from lane_ray.models.layers import ItemEmbedder

LossType = Literal["bce", "ce"]
CHECKPOINT_FORMAT = "lane-ray-recommender/1"


class SequentialRecommender(nn.Module):
    def __init__(self, cfg: ModelConfig, titles: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.items = ItemEmbedder(cfg.num_items, cfg.hidden, cfg.item_mode, cfg.title_dim, cfg.finetune_titles, titles,
                                  mask_token=self.backbone.cloze, sparse=cfg.sparse_items)
        self.align = (PreferenceAlignment(cfg.hidden, cfg.pref_dim, cfg.align_heads, cfg.align_dropout)
                      if cfg.align else None)

    @property
    def mask_index(self) -> int:
        return self.cfg.num_items + 1

    def encode(self, inputs: torch.Tensor, prefs: torch.Tensor | None = None, pref_mask: torch.Tensor | None = None,
               table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """States ``[B, L, H]`` of a padded index batch, aligned with the preferences when the model has the layer."""
        return self.aligned(self.backbone_states(inputs, table), prefs, pref_mask)

    def backbone_states(self, inputs: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone states ``[B, L, H]`` of a padded index batch (its last ``max_len`` columns), before alignment:
        they do not depend on the preferences, so an attribution reuses them across preference masks."""
        inputs = inputs[:, -self.cfg.max_len:]
        return self.backbone(self.items.lookup(inputs, table), inputs == 0)

    def aligned(self, states: torch.Tensor, prefs: torch.Tensor | None = None,
                pref_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone states ``[B, L, H]`` through the alignment layer (unchanged without one) and its weights
        ``[B, L, m]`` (``None`` without alignment). Position-wise: each state attends to the preferences only."""
        if self.align is None:
            return states, None
        if prefs is None:
            raise ValueError("this model aligns with preferences: pass prefs [B, m, D]")
        return self.align(states, prefs, pref_mask)

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, items: torch.Tensor, prefs: torch.Tensor | None = None, pref_mask: torch.Tensor | None = None,
                loss_type: LossType = "ce") -> torch.Tensor:
        """The training loss (so a DDP wrapper synchronises its gradients); see :meth:`loss`."""
        return self.loss(items, prefs, pref_mask, loss_type)

    def loss(self, items: torch.Tensor, prefs: torch.Tensor | None = None, pref_mask: torch.Tensor | None = None,
             loss_type: LossType = "ce") -> torch.Tensor:
        """Mean loss over a batch of left-padded train prefixes ``items [B, L + 1]``.

        Causal backbones predict ``items[:, 1:]`` from ``items[:, :-1]``; BERT4Rec masks ``mask_prob`` of the last
        L items (at least one per row) and predicts them. ``bce``: the target against one uniformly sampled
        negative per position (re-drawn once where it hits the target), as in SASRec; ``ce``: softmax over all items.
        ``bce`` with a causal backbone computes the vectors of the batch's items only (inputs, targets, negatives),
        so a step costs the batch, not the catalogue (a 1M-item title table is 25 GFLOP to project).
        """
        if loss_type == "bce" and not self.backbone.cloze:
            return self._sampled_loss(items, prefs, pref_mask)
        if self.cfg.sparse_items and self.cfg.item_mode == "id":
            raise ValueError("sparse_items trains with loss bce only (a softmax over all items touches every row)")
        table = self.items.table()
        if self.backbone.cloze:
            seq = items[:, 1:]
            real = seq > 0
            masked = (torch.rand(seq.shape, device=seq.device) < self.cfg.mask_prob) & real
            none = ~masked.any(1)
            masked[none, -1] = real[none, -1]
            inputs = seq.masked_fill(masked, self.mask_index)
            targets = seq.masked_fill(~masked, 0)
        else:
            inputs, targets = items[:, :-1], items[:, 1:].masked_fill(items[:, :-1] == 0, 0)
        states, _ = self.encode(inputs, prefs, pref_mask, table)
        sel = targets > 0  # [B, L]
        h, tgt = states[sel], targets[sel]  # [P, H], [P]
        rep = self.backbone.head(h, table, tgt)
        if loss_type == "ce":
            logits = rep @ table[1:].T  # [P, N]
            return F.cross_entropy(logits, tgt - 1)
        neg = torch.randint(1, self.cfg.num_items + 1, tgt.shape, device=tgt.device)
        clash = neg == tgt
        neg[clash] = torch.randint(1, self.cfg.num_items + 1, (int(clash.sum()),), device=tgt.device)
        pos_logit = (rep * table[tgt]).sum(-1)
        neg_logit = (rep * table[neg]).sum(-1)
        return F.binary_cross_entropy_with_logits(torch.cat([pos_logit, neg_logit]),
                                                  torch.cat([torch.ones_like(pos_logit), torch.zeros_like(neg_logit)]))

    def _sampled_loss(self, items: torch.Tensor, prefs: torch.Tensor | None,
                      pref_mask: torch.Tensor | None) -> torch.Tensor:
        """``bce`` for causal backbones on a compact table of the batch's items (indices remapped into it)."""
        inputs, targets = items[:, :-1], items[:, 1:].masked_fill(items[:, :-1] == 0, 0)
        sel = targets > 0
        tgt = targets[sel]
        neg = torch.randint(1, self.cfg.num_items + 1, tgt.shape, device=tgt.device)
        clash = neg == tgt
        neg[clash] = torch.randint(1, self.cfg.num_items + 1, (int(clash.sum()),), device=tgt.device)
        zero = torch.zeros(1, dtype=inputs.dtype, device=inputs.device)
        ids, inv = torch.unique(torch.cat([zero, inputs.reshape(-1), tgt, neg]), return_inverse=True)
        table = self.items.rows(ids)  # ids are sorted: index 0 (padding) stays 0
        n_in, n_t = inputs.numel(), tgt.numel()
        inputs_c = inv[1:1 + n_in].view_as(inputs)
        tgt_c, neg_c = inv[1 + n_in:1 + n_in + n_t], inv[1 + n_in + n_t:]
        states, _ = self.encode(inputs_c, prefs, pref_mask, table)
        rep = self.backbone.head(states[sel], table, tgt_c)
        pos_logit = (rep * table[tgt_c]).sum(-1)
        neg_logit = (rep * table[neg_c]).sum(-1)
        return F.binary_cross_entropy_with_logits(torch.cat([pos_logit, neg_logit]),
                                                  torch.cat([torch.ones_like(pos_logit), torch.zeros_like(neg_logit)]))

    # -- scoring -------------------------------------------------------------------------------------------
    def user_vectors(self, history: torch.Tensor, prefs: torch.Tensor | None = None,
                     pref_mask: torch.Tensor | None = None,
                     table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The representation ``[B, H]`` a history ``[B, L]`` scores items with, and the alignment weights of its
        last position ``[B, m]`` (``None`` without alignment)."""
        table = self.items.table() if table is None else table
        last = self.backbone_states(self.scoring_inputs(history), table)[:, -1:]  # [B, 1, H]
        return self.user_head(last, prefs, pref_mask, table)

    def scoring_inputs(self, history: torch.Tensor) -> torch.Tensor:
        """The index batch ``[B, L]`` a history ``[B, L]`` is scored from: the history itself, or for BERT4Rec the
        history without its first column and with the mask token appended (its state is the prediction)."""
        if not self.backbone.cloze:
            return history
        mask_col = torch.full_like(history[:, :1], self.mask_index)
        return torch.cat([history[:, 1:], mask_col], 1)

    def user_head(self, last: torch.Tensor, prefs: torch.Tensor | None = None, pref_mask: torch.Tensor | None = None,
                  table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The user representation ``[B, H]`` from the last backbone state ``last [B, 1, H]``: alignment (the layer
        is position-wise, so the last state alone gives the same result as the whole sequence) and the head;
        plus the alignment weights ``[B, m]`` (``None`` without alignment)."""
        table = self.items.table() if table is None else table
        states, weights = self.aligned(last, prefs, pref_mask)
        rep = self.backbone.head(states[:, -1], table)
        return rep, None if weights is None else weights[:, -1]

    def full_scores(self, history: torch.Tensor, prefs: torch.Tensor | None = None,
                    pref_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N + 1] scores of every item (column 0, padding, is -inf)."""
        table = self.items.table()
        rep, _ = self.user_vectors(history, prefs, pref_mask, table)
        scores = rep @ table.T
        scores[:, 0] = float("-inf")
        return scores

    def score(self, history: torch.Tensor, candidates: torch.Tensor, prefs: torch.Tensor | None = None,
              pref_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C] scores of candidate indices ``[B, C]``."""
        table = self.items.table()
        rep, _ = self.user_vectors(history, prefs, pref_mask, table)
        return (table[candidates] * rep.unsqueeze(1)).sum(-1)


def save_checkpoint(model: SequentialRecommender, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each atomically)."""
    from safetensors.torch import save_file

    from lane_ray.atomic import atomic_path
    from lane_ray.io import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    write_json(directory / "config.json", {"format": CHECKPOINT_FORMAT, "model": model.cfg.to_dict(),
                                           "meta": meta or {}})
    return directory


def load_checkpoint(directory: str | Path, map_location: str = "cpu") -> tuple[SequentialRecommender, dict[str, Any]]:
    """Rebuild a model from a checkpoint directory; returns ``(model in eval mode, meta)``."""
    from safetensors.torch import load_file

    from lane_ray.errors import DataError

    directory = Path(directory)
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.exists():
            raise DataError("checkpoint file missing", file=p)
    try:
        doc = json.loads(cfg_path.read_text())
        cfg = ModelConfig.from_dict(doc["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"not a lane-ray checkpoint config: {exc}", file=cfg_path) from None
    model = SequentialRecommender(cfg)
    try:
        state = load_file(str(weights), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as exc:  # safetensors' own error type (corrupt file) or a tensor size mismatch
        raise DataError(f"weights do not load into the model of config.json: {str(exc).splitlines()[0]}",
                        file=weights) from None
    if missing or unexpected:
        raise DataError(f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        file=weights)
    return model.eval(), doc.get("meta", {})
