"""Batched decoding for the ``transformers`` backend, built for short constrained replies after long prompts.

Where ``model.generate`` spends its time on such a batch (ml-100k preference prompts, ~620 tokens, ~54 new
tokens of which two thirds are forced by the template; ``benchmarks/llm_throughput.py --profile``), and what
this loop does instead:

- **Forced tokens cost a forward pass each.** A decode step of a small model on a CPU is bound by overhead and
  memory traffic, not arithmetic: one step with a few tokens per row costs about as much as one with a single
  token. So when the constraint leaves a row exactly one token (fixed text, the rest of a choice, a closing
  quote), the loop writes it at once and feeds the whole run to the model in the next step (jump-forward).
  Rows of one step carry runs of different lengths: shorter runs are left-padded, and the padding is masked.
- **The prompt prefix every row shares is computed once** (the chat template and system prompt), and kept
  for the next call while its tokens stay the same (:class:`PrefixCache`): retry rounds and later batches
  start from it.
- **Finished rows leave the batch** at once instead of decoding padding until the longest row ends.

Sampling matches ``generate``'s: the processor's penalty and mask, then temperature, then nucleus (top-p)
filtering, then one multinomial draw per row from a generator seeded with ``params.seed``. Forced tokens take
no draw, so a seed gives other samples than ``generate`` gave: the same distribution, not the same text.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any

from lane_ray.llm.backend import GenerationParams


def _cache_kwarg(model: Any) -> str:
    """The name under which the model's forward takes its KV cache (``cache`` in transformers >= 5.20)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix every row shares."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    k = 0
    while k < n and all(r[k] == first[k] for r in rows):
        k += 1
    return k


@functools.cache
def _growing_layer_class() -> Any:
    """A ``DynamicLayer`` that appends into preallocated room instead of concatenating. ``DynamicLayer.update``
    builds new key and value tensors every pass (``torch.cat``), so a pass copies the batch's whole cache: ~0.5 GB
    in bf16 for 32 rows of ~700 tokens of SmolLM2-135M, which bounds a decoding pass on a CPU by memory traffic.
    This layer writes the new columns in place and hands attention a view; it reallocates (doubling) only when the
    room runs out, and when rows leave the batch. None where transformers has no per-layer caches (< 4.56)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class GrowingLayer(DynamicLayer):
        room = 128  # free columns added past the needed length when the buffer is (re)allocated

        def _adopt(self, keys: Any, values: Any, capacity: int) -> None:
            import torch

            n = keys.shape[-2]
            shape = (*keys.shape[:-2], max(capacity, n), keys.shape[-1])
            self._kbuf = torch.empty(shape, dtype=keys.dtype, device=keys.device)
            self._vbuf = torch.empty(shape, dtype=values.dtype, device=values.device)
            self._kbuf[..., :n, :] = keys
            self._vbuf[..., :n, :] = values
            self.keys, self.values = self._kbuf[..., :n, :], self._vbuf[..., :n, :]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, w = self.get_seq_length(), key_states.shape[-2]
            if n == 0:
                self._adopt(key_states, value_states, w + self.room)
                return self.keys, self.values
            buf = getattr(self, "_kbuf", None)
            if (buf is None or buf.shape[:-2] != key_states.shape[:-2] or n + w > buf.shape[-2]
                    or self.keys.data_ptr() != buf.data_ptr()):  # no room, or keys replaced from outside
                self._adopt(self.keys, self.values, 2 * (n + w) + self.room)
            self._kbuf[..., n:n + w, :] = key_states
            self._vbuf[..., n:n + w, :] = value_states
            self.keys, self.values = self._kbuf[..., :n + w, :], self._vbuf[..., :n + w, :]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            n = self.get_seq_length()
            if n > 0:
                cap = getattr(self, "_kbuf", self.keys).shape[-2]
                self._adopt(self.keys.repeat_interleave(repeats, dim=0),
                            self.values.repeat_interleave(repeats, dim=0), cap)

        def batch_select_indices(self, indices: Any) -> None:
            n = self.get_seq_length()
            if n > 0:  # the kept rows, room included: one copy, and the next passes append in place again
                self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
                self.keys, self.values = self._kbuf[..., :n, :], self._vbuf[..., :n, :]

    return GrowingLayer


def new_cache() -> Any:
    """An empty KV cache whose layers append in place (:func:`_growing_layer_class`), or a plain
    ``DynamicCache`` where this transformers has no per-layer caches."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layer = _growing_layer_class()
    if layer is not None and getattr(cache, "layer_class_to_replicate", None) is not None and not cache.layers:
        cache.layer_class_to_replicate = layer
    return cache


class PrefixCache:
    """The KV cache of one token prefix, reused by the next call whose rows start with (part of) it."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.kv: Any = None
        self.reused_tokens = 0  # prompt tokens served from the cache, for the profile

    def extend(self, model: Any, ids: list[int], device: Any) -> Any:
        """A fresh cache holding the KV of ``ids`` (batch of one): the stored prefix, cropped to what it shares
        with ``ids``, then the rest computed. ``ids`` becomes the stored prefix."""
        import torch

        keep = common_prefix([self.ids, ids]) if self.kv is not None else 0
        if keep:
            kv = copy.deepcopy(self.kv)
            if keep < len(self.ids):
                kv.crop(keep - len(self.ids))  # a negative length: drop that many tokens from the end
        else:
            kv = new_cache()
        self.reused_tokens += keep
        if len(ids) > keep:
            with torch.inference_mode():
                model(input_ids=torch.tensor([ids[keep:]], device=device),
                      position_ids=torch.arange(keep, len(ids), device=device)[None],
                      use_cache=True, **{_cache_kwarg(model): kv})
        self.ids, self.kv = list(ids), copy.deepcopy(kv)
        return kv


@dataclass
class Decoded:
    """One row's generated tokens (EOS excluded) and whether it ended (EOS or a stop string) or hit the cap."""

    tokens: list[int]
    finished: bool


def sample(scores: Any, params: GenerationParams, generator: Any) -> list[int]:
    """One token per row of ``scores`` ([B, V], already penalised and masked): greedy at temperature 0, else
    temperature, top-p filtering and a multinomial draw."""
    import torch

    if params.temperature <= 0:
        return scores.argmax(dim=-1).tolist()
    scores = scores / params.temperature
    if params.top_p < 1.0:
        ordered, idx = torch.sort(scores, descending=False)
        cum = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - params.top_p)
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).flatten().tolist()


def decode(model: Any, prompts: list[list[int]], params: GenerationParams, eos: int, pad: int,
           processor: Any = None, prefix: PrefixCache | None = None, stop_check: Any = None) -> list[Decoded]:
    """Generate after each prompt (token ids) under ``processor`` (a
    :class:`~lane_ray.llm.transformers_backend.TemplateProcessor` with one row per prompt, or None), at most
    ``params.max_new_tokens`` tokens per row, EOS included. ``stop_check(tokens) -> bool`` ends a row early
    (stop strings). The prompt prefix shared by all rows comes from ``prefix`` when given."""
    import torch

    n = len(prompts)
    if not n or params.max_new_tokens <= 0:
        return [Decoded([], False) for _ in range(n)]
    device = model.device
    kw = _cache_kwarg(model)
    # the shared prefix: every row keeps at least one token of its own, whose logits start the reply
    p = max(0, min(common_prefix(prompts), min(len(x) for x in prompts) - 1))
    if p:
        cache = (prefix or PrefixCache()).extend(model, prompts[0][:p], device)
        cache.batch_repeat_interleave(n)
    else:
        cache = new_cache()
    out = [Decoded([], False) for _ in range(n)]
    done = [False] * n
    allowed: dict[int, Any] = {}

    def take(r: int, tok: int) -> list[int]:
        """Row ``r`` writes ``tok``, then every token the constraint forces after it; the tokens to feed."""
        run: list[int] = []
        while tok != eos:
            run.append(tok)
            out[r].tokens.append(tok)
            if processor is not None:
                processor.advance(r, tok)
            if stop_check is not None and stop_check(out[r].tokens):
                done[r] = out[r].finished = True
                return run
            if len(out[r].tokens) >= params.max_new_tokens:
                done[r] = True
                return run
            nxt = processor.allowed(r) if processor is not None else None
            if not isinstance(nxt, int):  # the model chooses the next token
                allowed[r] = nxt
                return run
            tok = nxt  # forced: written now, fed with the run
        done[r] = out[r].finished = True
        return run

    # the first step feeds each row's own prompt tokens, and the reply's opening where the constraint forces
    # it; later steps feed each row's newest run of tokens
    chunks = [x[p:] for x in prompts]
    for r in range(n):
        first = processor.allowed(r) if processor is not None else None
        if isinstance(first, int):
            chunks[r] = chunks[r] + take(r, first)
        else:
            allowed[r] = first
    mask = torch.ones((n, p), dtype=torch.long, device=device)
    next_pos = [p] * n
    active = [r for r in range(n) if not done[r]]
    generator = torch.Generator(device=device).manual_seed(params.seed)
    with torch.inference_mode():
        if active and len(active) < n:
            index = torch.tensor(active, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
        while active:
            width = max(len(chunks[r]) for r in active)
            ids = torch.full((len(active), width), pad, dtype=torch.long)
            cols = torch.zeros((len(active), width), dtype=torch.long)
            pos = torch.zeros((len(active), width), dtype=torch.long)
            for line, r in enumerate(active):
                c = chunks[r]
                ids[line, width - len(c):] = torch.tensor(c)
                cols[line, width - len(c):] = 1
                pos[line, : width - len(c)] = next_pos[r]
                pos[line, width - len(c):] = torch.arange(next_pos[r], next_pos[r] + len(c))
                next_pos[r] += len(c)
            mask = torch.cat([mask, cols.to(device)], dim=1)
            logits = model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device),
                           use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1, :]  # [B, V]
            scores = logits.float()
            if processor is not None:
                scores = processor.apply(scores, active, [allowed[r] for r in active])
            for r, tok in zip(active, sample(scores, params, generator), strict=True):
                chunks[r] = take(r, tok)
            keep = [line for line, r in enumerate(active) if not done[r]]
            if len(keep) < len(active):  # finished rows leave the batch
                if keep:
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask = mask[index]
                active = [active[line] for line in keep]
    return out


__all__ = ["Decoded", "PrefixCache", "common_prefix", "decode", "new_cache", "sample"]
