"""LLM layer: backends (transformers, vLLM, OpenAI-compatible), prompts, parsing, preference extraction and
explanations. Importing it loads no model library; backends import theirs when constructed."""

from __future__ import annotations

from typing import Any

from lane_ray.llm.backend import Generation, GenerationParams, JsonStringArray, LLMBackend

BACKENDS = ("transformers", "vllm", "openai")


def make_backend(kind: str, **kwargs: Any) -> LLMBackend:
    """Construct the backend ``kind`` with its keyword arguments."""
    if kind == "transformers":
        from lane_ray.llm.transformers_backend import TransformersBackend

        return TransformersBackend(**kwargs)
    from lane_ray.errors import ConfigError

    raise ConfigError(f"config field 'llm.backend': unknown or unavailable backend '{kind}' (choose from "
                      f"{', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "Generation", "GenerationParams", "JsonStringArray", "LLMBackend", "make_backend"]
