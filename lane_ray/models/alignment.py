"""The LANE preference-alignment layer."""

from __future__ import annotations

import torch
from torch import nn

from lane_ray.models.layers import FeedForward


class PreferenceAlignment(nn.Module):
    """Multi-head attention from sequence states to the user's preference embeddings.

    queries = states ``[B, L, H]``; keys/values = the ``m`` preference embeddings ``[B, m, D]`` projected to H;
    output = LN(states + Attn), then LN(x + FFN(x)). Returns the aligned states ``[B, L, H]`` and the attention
    weights ``[B, L, m]`` (averaged over heads; in eval mode each row sums to one over the present preferences; in
    training mode they carry attention dropout). Rows whose
    user has no preference at all pass through the residual path unchanged (weights all zero).
    """

    def __init__(self, hidden: int, pref_dim: int, heads: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        self.proj = nn.Linear(pref_dim, hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.ln1 = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden, dropout)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, states: torch.Tensor, prefs: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # states [B, L, H]; prefs [B, m, D]; mask [B, m] True where a preference is present
        B, m = prefs.shape[:2]
        if mask is None:
            mask = torch.ones(B, m, dtype=torch.bool, device=prefs.device)
        none = ~mask.any(1)  # [B] users without preferences
        key_pad = ~mask
        key_pad = key_pad & ~none.unsqueeze(1)  # avoid all-masked rows (NaN); their output is dropped below
        kv = self.proj(prefs)  # [B, m, H]
        a, w = self.attn(states, kv, kv, key_padding_mask=key_pad, need_weights=True, average_attn_weights=True)
        keep = (~none).to(states.dtype).view(B, 1, 1)
        x = self.ln1(states + self.drop(a) * keep)
        x = self.ln2(x + self.ffn(x))
        return x, w * keep  # w [B, L, m]
