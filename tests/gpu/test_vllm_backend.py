"""The vllm backend on a real GPU: constrained generation and preference extraction through ray.data.llm.

Skipped without CUDA (tests/gpu/conftest.py) or without vLLM. The model is ``$LANE_TEST_LLM`` (an HF
directory, .gguf or packaged name) or the packaged SmolLM2-135M GGUF, which the backend converts once into
an HF directory (vLLM 0.24 has no GGUF loader). Each ``generate`` call starts its engine afresh: the
engines run eagerly (no CUDA-graph capture) here to keep that start short.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM not installed (pip install 'lane-ray[gpu]')")

from lane_ray.llm.backend import Choice, GenerationParams, Text, json_string_array  # noqa: E402
from lane_ray.llm.preferences import ExtractionSettings, UserHistory, extract_batch  # noqa: E402
from lane_ray.llm.prompts import PREFERENCE_PREFILL, HistoryItem  # noqa: E402

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "1980s", "1990s")
HISTORIES = [
    [("Alien (1979)", "Horror|Sci-Fi", "1979"), ("Aliens (1986)", "Action|Sci-Fi", "1986"),
     ("The Thing (1982)", "Horror|Sci-Fi", "1982"), ("Predator (1987)", "Action|Sci-Fi", "1987")],
    [("Sleepless in Seattle (1993)", "Comedy|Romance", "1993"), ("Notting Hill (1999)", "Comedy|Romance", "1999"),
     ("Pretty Woman (1990)", "Comedy|Romance", "1990"), ("Ghost (1990)", "Drama|Romance", "1990")],
    [("Heat (1995)", "Action|Drama", "1995"), ("Die Hard (1988)", "Action", "1988"),
     ("Speed (1994)", "Action", "1994"), ("Point Break (1991)", "Action", "1991")],
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    import ray

    from lane_ray.llm.vllm_backend import VLLMBackend

    ray.init(num_cpus=min(8, os.cpu_count() or 1), _temp_dir=str(tmp_path_factory.mktemp("ray")),
             include_dashboard=False, ignore_reinit_error=True)
    model = os.environ.get("LANE_TEST_LLM", "smollm2-135m-instruct")
    cache = os.environ.get("LANE_MODEL_CACHE") or str(tmp_path_factory.mktemp("models"))
    b = VLLMBackend(model, gpu_memory_utilization=0.3, max_model_len=2048, enforce_eager=True,
                    model_cache_dir=cache)
    assert Path(b.model_source, "config.json").exists()
    yield b
    ray.shutdown()


def test_constrained_generation_matches_template_in_order(backend):
    words = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ '-"
    constraint = json_string_array(3, 0, 2, 12, head=(Choice(GENRES), Text(" ")), chars=words)
    convs = [[{"role": "user", "content": f"List three kinds of films someone who loves {h[0][0]} enjoys."}]
             for h in HISTORIES]
    convs.append(convs[0])  # same conversation, same seed: same text (seeds are per request)
    gens = backend.generate(convs, GenerationParams(max_new_tokens=64, temperature=0.8, seed=11),
                            prefill=PREFERENCE_PREFILL, constraint=constraint)
    assert len(gens) == len(convs)
    for g in gens:
        assert g.finish_reason == "stop" and g.new_tokens > 0
        assert constraint.matches(g.text), g.text
        prefs = json.loads(PREFERENCE_PREFILL + g.text)["preferences"]
        assert len(prefs) == 3 and all(p.split(" ")[0] in GENRES for p in prefs)
    assert gens[0].text == gens[-1].text


def test_preference_extraction_for_a_few_users(backend):
    users = [UserHistory(uid, [HistoryItem(*it) for it in h]) for uid, h in enumerate(HISTORIES, start=1)]
    s = ExtractionSettings(m=3, max_retries=1, vocabulary=GENRES, max_slot_tokens=10)
    results = extract_batch(users, backend, s, backend.count_tokens)
    assert [r.user_id for r in results] == [1, 2, 3]
    for r in results:
        assert len(r.preferences) == 3 and len(set(r.preferences)) == 3
        assert r.status in {"ok", "repaired", "fallback"}
        first = json.loads(r.raw.split("\n---\n")[0])  # constrained: the first round is always valid JSON
        assert len(first["preferences"]) == 3
        assert r.new_tokens > 0
