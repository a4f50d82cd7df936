"""The LLM backend protocol: batched chat generation with sampling parameters and an optional
output constraint. Implementations: ``transformers`` (CPU/GPU, HF directory or GGUF), ``vllm`` (GPU, Ray
Data's ``ray.data.llm``) and ``openai`` (any OpenAI-compatible server). Heavy imports stay inside them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one batch."""

    max_new_tokens: int = 96
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class JsonStringArray:
    """Constrain output to ``<prefill>s1", "s2", ..., "sm"]}``: the assistant turn is pre-filled up to the
    first string's opening quote; every slot is a string of ``min_tokens..max_tokens`` tokens without quotes,
    backslashes, brackets or control characters. ``slots_done`` slots are already in the prefill."""

    m: int
    prefill: str
    slots_done: int = 0
    min_tokens: int = 2
    max_tokens: int = 16


@dataclass
class Generation:
    """One completion: the text after the prefill, new tokens generated, and why generation stopped."""

    text: str
    new_tokens: int
    finish_reason: str = "stop"
    extra: dict = field(default_factory=dict)


@runtime_checkable
class LLMBackend(Protocol):
    """Batched chat generation. ``prefill`` (optional) is the beginning of the assistant's reply."""

    model_id: str

    def generate(self, conversations: list[Messages], params: GenerationParams, prefill: str = "",
                 constraint: JsonStringArray | None = None) -> list[Generation]: ...
