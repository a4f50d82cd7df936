"""The encoder in fp16 on CUDA agrees with the CPU fp32 encoder."""

from __future__ import annotations

import numpy as np

from lane_ray.text import TextEncoder

TITLES = ["Toy Story", "Heat", "The Usual Suspects", "Schindler's List", "Babe: Pig in the City"] * 20


def test_fp16_cuda_matches_cpu():
    gpu = TextEncoder(device="cuda", batch_size=64)
    cpu = TextEncoder(device="cpu", batch_size=64)
    assert gpu.fp16
    a, b = gpu.encode(TITLES), cpu.encode(TITLES)
    assert a.dtype == np.float32 and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-3)
    assert (a * b).sum(1).min() > 0.999


def test_tokens_from_cpu_encoded_on_cuda_match_encode():
    """The GPU stage's split: tokenized on a CPU worker, run on the GPU actor."""
    gpu = TextEncoder(device="cuda", batch_size=64)
    feats = TextEncoder(device="cpu").tokenize(TITLES)
    a, b = gpu.encode_tokens(feats), gpu.encode(TITLES)
    assert (a * b).sum(1).min() > 0.999
