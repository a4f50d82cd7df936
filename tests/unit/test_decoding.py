"""Pieces of the decoding loop that need no model: the shared prefix and the sampler."""

from __future__ import annotations

import pytest

from lane_ray.llm.backend import GenerationParams
from lane_ray.llm.decoding import common_prefix, sample


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3]]) == 3
    assert common_prefix([[1], [2]]) == 0
    assert common_prefix([]) == 0


def test_sample_greedy_top_p_and_masked_tokens():
    torch = pytest.importorskip("torch")
    neg = torch.finfo(torch.float32).min
    scores = torch.tensor([[0.0, 5.0, 1.0, neg], [3.0, 0.0, neg, 2.9]])
    gen = torch.Generator().manual_seed(0)
    assert sample(scores.clone(), GenerationParams(temperature=0.0), gen) == [1, 0]
    # top_p 0.5 keeps only the most likely token of each row
    draws = {tuple(sample(scores.clone(), GenerationParams(temperature=1.0, top_p=0.5), gen)) for _ in range(50)}
    assert draws == {(1, 0)}
    # a masked token is never drawn, however hot the sampling
    hot = GenerationParams(temperature=5.0, top_p=1.0)
    picks = [sample(scores.clone(), hot, gen) for _ in range(300)]
    assert all(a != 3 and b != 2 for a, b in picks)
    assert {a for a, _ in picks} >= {0, 1, 2} and {b for _, b in picks} >= {0, 1, 3}


def test_sample_is_reproducible_for_a_seed():
    torch = pytest.importorskip("torch")
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    p = GenerationParams(temperature=0.8, top_p=0.95)
    a = sample(scores, p, torch.Generator().manual_seed(7))
    b = sample(scores, p, torch.Generator().manual_seed(7))
    assert a == b
