"""Layers shared by the backbones: a pre-LayerNorm transformer block and the item embedders."""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, hidden: int, dropout: float, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or 4 * hidden
        self.net = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, hidden),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN self-attention block (as in SASRec): x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden, dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, causal: bool) -> torch.Tensor:
        # x [B, L, H]; pad [B, L] True at padding
        B, L = pad.shape
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        blocked = pad.unsqueeze(1).expand(B, L, L)  # [B, Lq, Lk]: no query sees a padded key...
        if causal:
            blocked = blocked | torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), 1)
        blocked = blocked & ~eye  # ...but every query sees itself, so no row is fully masked (pads are zeroed below)
        # so a history's states do not depend on how much padding precedes it
        attn_mask = blocked.repeat_interleave(self.attn.num_heads, 0)  # [B * heads, L, L]
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)
        x = x + a
        x = x + self.ffn(self.ln2(x))
        return x.masked_fill(pad.unsqueeze(-1), 0.0)


class ItemEmbedder(nn.Module):
    """Item vectors ``[N + 1, H]`` (row 0 = padding, zero) in one of two modes.

    ``id``: a learned table. ``title``: title embeddings ``[N + 1, D]`` through a learned projection D -> H; the
    title vectors are a frozen buffer, or a parameter initialised from the titles when ``finetune`` is set.
    With ``mask_token`` (BERT4Rec) a learned mask vector sits at index N + 1 of :meth:`lookup` (only then: DDP
    rejects parameters that take no part in the loss).
    """

    def __init__(self, num_items: int, hidden: int, mode: str, title_dim: int = 384, finetune: bool = False,
                 titles: torch.Tensor | None = None, mask_token: bool = False, sparse: bool = False) -> None:
        super().__init__()
        self.num_items, self.mode = num_items, mode
        self.mask_token = nn.Parameter(torch.randn(hidden) * 0.02) if mask_token else None
        if mode == "id":
            # sparse: a step's gradient holds the rows it touched, not the whole table (huge catalogues)
            self.table_ = nn.Embedding(num_items + 1, hidden, padding_idx=0, sparse=sparse)
            nn.init.normal_(self.table_.weight, std=hidden ** -0.5)
            with torch.no_grad():
                self.table_.weight[0].zero_()
        else:
            t = torch.zeros(num_items + 1, title_dim) if titles is None else titles.detach().float().clone()
            if t.shape != (num_items + 1, title_dim):
                raise ValueError(f"title vectors have shape {tuple(t.shape)}, expected {(num_items + 1, title_dim)}")
            if finetune:
                self.titles = nn.Parameter(t)
            else:
                self.register_buffer("titles", t)
            self.proj = nn.Linear(title_dim, hidden)

    def table(self) -> torch.Tensor:
        """[N + 1, H] item vectors; row 0 (padding) is zero."""
        if self.mode == "id":
            return self.table_.weight
        out = self.proj(self.titles)
        return torch.cat([torch.zeros_like(out[:1]), out[1:]], 0)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[K, H] vectors of the item indices ``ids [K]`` only (index 0 gives the zero padding row): what a loss
        over a few items needs, without projecting the whole title table."""
        if self.mode == "id":
            return self.table_(ids)
        out = self.proj(self.titles[ids])
        return out * (ids != 0).unsqueeze(-1).to(out.dtype)

    def lookup(self, idx: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] vectors of indices ``idx`` (0 = pad, N + 1 = mask token)."""
        table = self.table() if table is None else table
        if self.mask_token is None:
            return table[idx]
        return torch.cat([table, self.mask_token.unsqueeze(0)], 0)[idx]
