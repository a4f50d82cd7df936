"""LLM layer: backends (transformers, vLLM, OpenAI-compatible), prompts, parsing, preference extraction and
explanations. Importing it loads no model library; backends import theirs when constructed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lane_ray.llm.backend import (
    Choice,
    FreeText,
    Generation,
    GenerationParams,
    LLMBackend,
    Template,
    Text,
    json_string_array,
)

if TYPE_CHECKING:
    from lane_ray.config import LLMConfig

BACKENDS = ("transformers", "vllm", "openai")


def make_backend(kind: str, **kwargs: Any) -> LLMBackend:
    """Construct the backend ``kind`` with its keyword arguments (see :func:`backend_kwargs`)."""
    if kind == "transformers":
        from lane_ray.llm.transformers_backend import TransformersBackend

        return TransformersBackend(**kwargs)
    if kind == "vllm":
        from lane_ray.llm.vllm_backend import VLLMBackend

        return VLLMBackend(**kwargs)
    if kind == "openai":
        from lane_ray.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(**kwargs)
    from lane_ray.errors import ConfigError

    raise ConfigError(f"config field 'llm.backend': unknown backend '{kind}' (choose from {', '.join(BACKENDS)})")


def backend_kwargs(llm: LLMConfig) -> dict[str, Any]:
    """Constructor arguments of the configured backend, from the ``llm`` config section."""
    if llm.backend == "transformers":
        return {"model": llm.model, "device": llm.device, "dtype": llm.dtype, "num_threads": llm.threads_per_actor,
                "max_prompt_tokens": llm.max_prompt_tokens}
    if llm.backend == "vllm":
        return {"model": llm.model, "tensor_parallel_size": llm.tensor_parallel_size, "replicas": llm.replicas,
                "gpu_memory_utilization": llm.gpu_memory_utilization, "max_model_len": llm.max_model_len,
                "enforce_eager": llm.enforce_eager}
    return {"model": llm.model, "base_url": llm.base_url, "api_key_env": llm.api_key_env,
            "timeout_s": llm.timeout_s, "max_concurrency": llm.max_concurrency,
            "constraint_format": llm.constraint_format, "max_retries": llm.request_retries}


def model_identity(llm: LLMConfig) -> str:
    """The model id used in cache keys, computed without loading the model: for local files the name plus
    a hash of the file sizes; for a served model its name and server."""
    if llm.backend == "openai":
        from lane_ray.llm.openai_backend import resolve_base_url

        return f"{llm.model}@{resolve_base_url(llm.base_url)}"
    from lane_ray.llm.transformers_backend import llm_id

    if llm.backend == "vllm":
        from pathlib import Path

        return llm_id(llm.model) if Path(llm.model).expanduser().exists() else llm.model
    return llm_id(llm.model)


__all__ = ["BACKENDS", "Choice", "FreeText", "Generation", "GenerationParams", "LLMBackend", "Template", "Text",
           "backend_kwargs", "json_string_array", "make_backend", "model_identity"]
