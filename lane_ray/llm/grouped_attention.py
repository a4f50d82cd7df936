"""Grouped-query attention without copying the KV cache, for passes that feed several tokens per row.

Models with fewer KV heads than query heads (SmolLM2-135M: 9 query heads on 3 KV heads) share each KV head
among a group of query heads. transformers' SDPA path handles that for a single query token by folding the group
into the query's length, but for several tokens per row under a padding mask it repeats the keys and values to
one copy per query head (``repeat_kv``): with a long cache, that copy is most of a decoding pass on a CPU (a pass
with 4 tokens per row of 32 rows after 700 cached tokens copies ~1.5 GB in bf16). The decoding loop feeds
several tokens per row whenever the template forces a run (``lane_ray/llm/decoding.py``), and it always passes
a padding mask.

:func:`grouped_sdpa` folds the group into the query's length for any number of tokens: the query
``[B, G*R, Q, D]`` becomes ``[B, G, R*Q, D]``, the mask is repeated R times along the query axis (it is small),
and one SDPA call attends the G KV heads as they are. :func:`use_grouped_sdpa` registers it under the name
``lane_sdpa`` (an attention function and the SDPA mask builder) and switches a loaded model to it.
"""

from __future__ import annotations

from typing import Any

NAME = "lane_sdpa"


def grouped_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                 scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' SDPA attention, with grouped queries folded instead of keys and values repeated. Cases it
    does not cover (one query token, no mask, a per-head mask, position biases, soft-capping) go to transformers'
    own function unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q, d = query.shape
    if (groups <= 1 or q == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = heads // groups
    folded = query.reshape(b, kv_heads, groups * q, d)  # head h = g * groups + r -> [b, g, r * q + i]
    mask = attention_mask.repeat(1, 1, groups, 1)  # row r * q + i of the folded query keeps row i's mask
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: Any) -> bool:
    """Switch ``model`` to :func:`grouped_sdpa` where it runs transformers' SDPA attention with grouped KV heads;
    True when switched. Models on another attention implementation, or transformers without an attention
    registry, are left as they are."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or heads == kv_heads:
        return False
    AttentionInterface.register(NAME, grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(NAME)
    else:
        config._attn_implementation = NAME
    return getattr(config, "_attn_implementation", None) == NAME


__all__ = ["NAME", "grouped_sdpa", "use_grouped_sdpa"]
