"""``vllm`` backend: the vLLM engine in Ray actors on GPUs, through Ray's own ``ray.data.llm``.

One :meth:`VLLMBackend.generate` call is one Ray Data job: the conversations become rows (prompt token ids
rendered here with the model's chat template plus the prefill, and per-row vLLM sampling parameters), a
``ray.data.llm`` processor (``vLLMEngineProcessorConfig`` + ``build_processor``) runs them through
``replicas`` engine actors of ``tensor_parallel_size`` GPUs each, and the results come back in input order.

Cost of one call: Ray Data starts the engine actors for the job and stops them at its end (an actor pool
lives as long as one dataset execution), so **every call pays the engine start** (weights loaded, KV cache
profiled, CUDA graphs captured: tens of seconds for a small model, minutes for a large one) plus the
generation itself. The processor object is built once per backend and reused; the engines are not. Call
``generate`` (or :meth:`VLLMBackend.generate_each`, which takes a prefill and a constraint per row) with as
many conversations as possible: thousands, not tens (see docs/gpu.md).

Prompts are rendered and tokenized here, not by the processor's chat-template and tokenizer stages: the
assistant prefill must continue the rendered ``add_generation_prompt=True`` prompt exactly as the
``transformers`` backend does, and vLLM gets token ids so no BOS is added twice. vLLM 0.24 has no GGUF
loader, so a GGUF model (file, folder or packaged name) is converted once into an HF directory (weights
dequantised to bfloat16) in a local cache. Constraints become a regular expression for vLLM's structured
outputs (``SamplingParams.structured_outputs = StructuredOutputsParams(regex=...)``, the field Ray 2.60's
vLLM stage forwards).

:meth:`VLLMBackend.score` is one Ray Data job too: each row is the prompt's token ids followed by the
continuation's, sent with ``SamplingParams(prompt_logprobs=0, max_tokens=1)``; vLLM returns the log-probability
of every prompt token (``prompt_logprobs``: per position ``None`` or ``{token_id: {"logprob": ...}}``), and the
score is the sum over the continuation's positions (:func:`continuation_logprob`).

Nothing here imports vllm, torch, transformers or ``ray.data.llm`` at module import.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lane_ray.atomic import publish
from lane_ray.errors import LaneError
from lane_ray.llm.backend import (
    Constraint,
    Generation,
    GenerationParams,
    Messages,
    Template,
    per_row,
)

INSTALL_HINT = "install the gpu extra: pip install 'lane-ray[gpu]'"
class VLLMError(LaneError):
    """The vLLM backend cannot run: vLLM missing, no GPU in the cluster, model missing or a prompt too long."""


# ---------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ResolvedModel:
    """Where the engine loads the model from. ``gguf`` is set when ``source`` is a GGUF that must be
    converted first (vLLM 0.24 has no GGUF loader); ``local`` is False for a hub id left to vLLM."""

    source: str
    gguf: Path | None = None
    local: bool = True


def resolve_model(model: str) -> ResolvedModel:
    """Classify ``model``: an HF directory, a GGUF (file, folder holding one, or packaged name) or a hub id.
    A path that does not exist raises :class:`VLLMError`."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedModel(str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(str(ggufs[0].resolve()), gguf=ggufs[0].resolve())
        raise VLLMError(f"llm.model '{model}': folder has no config.json and not exactly one .gguf file")
    if path.is_file():
        if path.suffix == ".gguf":
            return ResolvedModel(str(path.resolve()), gguf=path.resolve())
        raise VLLMError(f"llm.model '{model}': a file must be a .gguf; otherwise give an HF model directory")
    from lane_ray.llm.transformers_backend import PACKAGED_LLMS, locate_llm

    if model.lower() in PACKAGED_LLMS:
        folder, gguf = locate_llm(model)  # raises a one-line error naming the package when not installed
        file = (folder / gguf) if gguf else folder
        return ResolvedModel(str(file), gguf=file if gguf else None)
    if model.startswith(("/", "~", ".")) or model.endswith(".gguf") or model.count("/") > 1:
        raise VLLMError(f"llm.model '{model}': path not found (give an HF model directory or a .gguf file)")
    return ResolvedModel(model, local=False)  # an HF hub id: vLLM resolves it (HF_HUB_OFFLINE applies)


def model_id_for(model: str) -> str:
    """The id written next to every result and used in cache keys. It equals
    ``lane_ray.llm.model_identity`` for the vllm backend: ``llm_id`` for an existing path, else the name."""
    if Path(model).expanduser().exists():
        from lane_ray.llm.transformers_backend import llm_id

        return llm_id(model)
    return model


def default_model_cache() -> Path:
    """Where converted GGUF models are kept: ``$LANE_MODEL_CACHE`` or ``~/.cache/lane_ray/vllm-models``."""
    return Path(os.environ.get("LANE_MODEL_CACHE", "~/.cache/lane_ray/vllm-models")).expanduser()


def converted_dir_name(gguf: Path) -> str:
    """Cache folder name of a converted GGUF: file stem plus a hash of its name and size."""
    h = hashlib.sha1(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return f"{gguf.stem}@{h}"


def convert_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """An HF directory (bfloat16 safetensors + tokenizer with its chat template) made from ``gguf`` with
    transformers, written once to a temp name and renamed. Returns the cached directory on later calls."""
    out = (cache_dir or default_model_cache()) / converted_dir_name(gguf)
    if (out / "config.json").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kw: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    try:  # transformers >= 5 keeps GGUF blocks packed unless told to unpack them
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.bfloat16, **kw)
    # the weights are plain dense tensors now: drop the GGUF quantizer, which refuses to serialise
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        publish(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ constraint


def sampling_params_dict(params: GenerationParams, constraint: Template | None = None,
                         chars_per_token: int = 4) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keyword arguments for one row (the ``sampling_params`` column of Ray's vLLM
    stage). Temperature 0 is greedy. The seed is per request, so a row's output does not depend on what
    else is in the batch. With a constraint, ``max_tokens`` is raised to the template's length bound, so a
    constrained generation is never cut off before the template is complete."""
    greedy = params.temperature <= 0
    max_tokens = params.max_new_tokens
    out: dict[str, Any] = {
        "temperature": 0.0 if greedy else float(params.temperature),
        "top_p": 1.0 if greedy else float(params.top_p),
        "seed": int(params.seed),
        "frequency_penalty": float(params.frequency_penalty),
        "skip_special_tokens": True,
        # every row carries every key: Ray Data blocks built from these rows then share one schema
        "stop": list(params.stop),
        "structured_outputs": None,
    }
    if constraint is not None:
        out["structured_outputs"] = {"regex": constraint.to_regex(chars_per_token)}
        max_tokens = max(max_tokens, constraint.max_chars(chars_per_token) + 1)  # + EOS
    out["max_tokens"] = int(max_tokens)
    return out


# ------------------------------------------------------------------------------------------------ rows


def render_prompt(tokenizer: Any, conversation: Messages, prefill: str = "") -> str:
    """The prompt text: the chat template with the assistant header, then the prefill (as the
    ``transformers`` backend renders it, so both backends continue the same text)."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return text + prefill


def build_rows(prompt_token_ids: Sequence[Sequence[int]], sampling: Sequence[dict[str, Any]],
               max_model_len: int) -> list[dict[str, Any]]:
    """Input rows of the processor: ``idx`` (input position), ``tokenized_prompt``, ``sampling_params`` and
    ``max_tokens`` (kept for the finish reason: the vLLM stage consumes ``sampling_params``). A prompt that
    leaves no room for its ``max_tokens`` within ``max_model_len`` raises :class:`VLLMError`."""
    if len(prompt_token_ids) != len(sampling):
        raise ValueError("one sampling-params dict per prompt")
    rows = []
    for i, (ids, sp) in enumerate(zip(prompt_token_ids, sampling, strict=True)):
        if len(ids) + sp["max_tokens"] > max_model_len:
            raise VLLMError(f"conversation {i}: prompt of {len(ids)} tokens + {sp['max_tokens']} new tokens "
                            f"exceeds llm.max_model_len={max_model_len}")
        rows.append({"idx": i, "tokenized_prompt": [int(t) for t in ids], "sampling_params": dict(sp),
                     "max_tokens": int(sp["max_tokens"])})
    return rows


def postprocess_row(row: dict[str, Any], eos_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    """One processor output row -> ``idx``, ``text`` (the continuation after the prefill: vLLM returns only
    new text), ``new_tokens`` and ``finish_reason`` (``length`` when ``max_tokens`` were generated without
    ending on EOS, else ``stop``)."""
    tokens = row.get("generated_tokens")
    n = int(row.get("num_generated_tokens") or (len(tokens) if tokens is not None else 0))
    last = int(tokens[-1]) if tokens is not None and len(tokens) else None
    length = n >= int(row["max_tokens"]) and last not in eos_ids
    return {"idx": int(row["idx"]), "text": str(row.get("generated_text") or ""), "new_tokens": n,
            "finish_reason": "length" if length else "stop"}


def collect_generations(rows: Sequence[dict[str, Any]], n: int) -> list[Generation]:
    """Postprocessed rows (any order) -> one :class:`Generation` per input, in input order."""
    by_idx = {int(r["idx"]): r for r in rows}
    if len(by_idx) != n or set(by_idx) != set(range(n)):
        missing = sorted(set(range(n)) - set(by_idx))[:5]
        raise VLLMError(f"vLLM returned {len(by_idx)} of {n} generations (missing e.g. {missing})")
    return [Generation(str(by_idx[i]["text"]), int(by_idx[i]["new_tokens"]), str(by_idx[i]["finish_reason"]))
            for i in range(n)]


# -------------------------------------------------------------------------------------------- scoring


def score_sampling_params() -> dict[str, Any]:
    """vLLM ``SamplingParams`` keyword arguments of a scoring row: greedy, one new token (vLLM needs at least
    one), and the log-probability of every prompt token (``prompt_logprobs=0``: the actual token only)."""
    return {"temperature": 0.0, "top_p": 1.0, "seed": 0, "max_tokens": 1, "prompt_logprobs": 0,
            "skip_special_tokens": True, "stop": [], "structured_outputs": None}


def build_score_rows(prompt_token_ids: Sequence[Sequence[int]], continuation_token_ids: Sequence[Sequence[int]],
                     max_model_len: int) -> list[dict[str, Any]]:
    """Input rows of a scoring job: ``idx``, ``tokenized_prompt`` (prompt then continuation ids), ``score_from``
    (where the continuation starts) and ``sampling_params``. Rows with an empty continuation are left out
    (they score 0.0). A row longer than ``max_model_len`` - 1 raises :class:`VLLMError`."""
    if len(prompt_token_ids) != len(continuation_token_ids):
        raise ValueError("one continuation per prompt")
    rows = []
    for i, (p, c) in enumerate(zip(prompt_token_ids, continuation_token_ids, strict=True)):
        if not len(c):
            continue
        ids = [int(t) for t in p] + [int(t) for t in c]
        if len(ids) + 1 > max_model_len:
            raise VLLMError(f"conversation {i}: prompt + continuation of {len(ids)} tokens exceeds "
                            f"llm.max_model_len={max_model_len}")
        rows.append({"idx": i, "tokenized_prompt": ids, "score_from": len(p),
                     "sampling_params": score_sampling_params(), "max_tokens": 1})
    return rows


def _logprob_of(entry: Any, token: int) -> float:
    """The log-probability of ``token`` in one position's ``{token_id: {"logprob": ..}}`` (keys may have become
    strings and values plain floats on the way through Arrow)."""
    if entry is None:
        raise VLLMError("vLLM returned no prompt logprob for a continuation token")
    if not isinstance(entry, dict):
        entry = dict(entry)
    value = entry.get(token, entry.get(str(token)))
    if value is None:
        raise VLLMError(f"vLLM's prompt logprobs lack the prompt token {token}")
    if isinstance(value, dict):
        value = value["logprob"]
    return float(getattr(value, "logprob", value))


def continuation_logprob(prompt_logprobs: Sequence[Any], token_ids: Sequence[int], start: int) -> float:
    """Sum of the log-probabilities of ``token_ids[start:]`` from vLLM's per-position ``prompt_logprobs``
    (position 0 is ``None``: nothing predicts the first token)."""
    if len(prompt_logprobs) < len(token_ids):
        raise VLLMError(f"vLLM returned {len(prompt_logprobs)} prompt logprobs for {len(token_ids)} prompt tokens")
    return sum(_logprob_of(prompt_logprobs[t], int(token_ids[t])) for t in range(max(1, start), len(token_ids)))


def postprocess_score_row(row: dict[str, Any]) -> dict[str, Any]:
    """One scoring output row -> ``idx`` and ``score``."""
    lps = row.get("prompt_logprobs")
    if lps is None:
        raise VLLMError("vLLM returned no prompt_logprobs (is the engine's max_logprobs >= 0?)")
    ids = row.get("prompt_token_ids")
    if ids is None:
        ids = row["tokenized_prompt"]
    return {"idx": int(row["idx"]), "score": continuation_logprob(list(lps), list(ids), int(row["score_from"]))}


def collect_scores(rows: Sequence[dict[str, Any]], n: int) -> list[float]:
    """Postprocessed scoring rows (any order) -> one float per input; inputs without a row (empty
    continuations) score 0.0."""
    out = [0.0] * n
    for r in rows:
        out[int(r["idx"])] = float(r["score"])
    return out


# ------------------------------------------------------------------------------------------- processor


def engine_kwargs(tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85, max_model_len: int = 4096,
                  max_num_seqs: int | None = None, enforce_eager: bool = False,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of vLLM's engine (``AsyncEngineArgs``) for one replica."""
    kw: dict[str, Any] = {"tensor_parallel_size": int(tensor_parallel_size),
                          "gpu_memory_utilization": float(gpu_memory_utilization),
                          "max_model_len": int(max_model_len), "enforce_eager": bool(enforce_eager)}
    if max_num_seqs is not None:
        kw["max_num_seqs"] = int(max_num_seqs)
    kw.update(extra or {})
    return kw


def processor_config_kwargs(model_source: str, engine: dict[str, Any], replicas: int = 1, batch_size: int = 64,
                            max_concurrent_batches: int = 8) -> dict[str, Any]:
    """Arguments of ``ray.data.llm.vLLMEngineProcessorConfig``: the engine stage only (prompts arrive as
    token ids and vLLM detokenizes), ``replicas`` engine actors."""
    return {"model_source": model_source, "engine_kwargs": dict(engine), "concurrency": int(replicas),
            "batch_size": int(batch_size), "max_concurrent_batches": int(max_concurrent_batches),
            "chat_template_stage": False, "tokenize_stage": False, "detokenize_stage": False,
            "log_engine_metrics": True}  # vLLM's engine metrics on Ray's Prometheus endpoint


def eos_token_ids(tokenizer_eos: int | list[int] | None, model_dir: Path | None = None) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's EOS plus ``eos_token_id`` of the model's
    ``generation_config.json`` (vLLM stops on both)."""
    ids: list[int] = []
    for v in (tokenizer_eos, _generation_config_eos(model_dir)):
        ids.extend(v if isinstance(v, list) else ([v] if v is not None else []))
    return tuple(sorted({int(i) for i in ids}))


def _generation_config_eos(model_dir: Path | None) -> int | list[int] | None:
    f = model_dir / "generation_config.json" if model_dir is not None else None
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        return None


def num_blocks(n_rows: int, batch_size: int, replicas: int) -> int:
    """Input blocks of one job: at least one per engine replica, about one per engine batch."""
    return max(1, min(n_rows, max(replicas, math.ceil(n_rows / max(1, batch_size)))))


def check_vllm_installed() -> None:
    """:class:`VLLMError` when vllm is not importable (checked without importing it)."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMError(f"the vllm backend needs vLLM: {INSTALL_HINT}")


def wait_for_gpus(tensor_parallel_size: int, timeout_s: float | None = None) -> None:
    """Wait until one node of the cluster holds an engine replica (``tensor_parallel_size`` GPUs), asking the
    autoscaler for it (:func:`lane_ray.pipeline.cluster.wait_for_resources`); a :class:`VLLMError` naming the GPUs
    after the wait (none on a local cluster lane started: it cannot grow). Without this Ray Data would wait for
    GPUs forever."""
    from lane_ray.config import RayConfig
    from lane_ray.pipeline.cluster import init_ray, wait_for_resources

    cfg = RayConfig()
    init_ray(cfg)  # an initialised Ray is used as it is
    try:
        wait_for_resources([{"GPU": float(tensor_parallel_size)}], "the vllm backend (one engine replica)", cfg,
                           timeout_s)
    except LaneError as exc:
        raise VLLMError(f"{exc}; on CPU use llm.backend=transformers") from None


class VLLMBackend:
    """Batched chat generation with vLLM engines run by ``ray.data.llm`` (see the module docstring for what
    one call costs). ``model``: an HF directory, a .gguf file or folder, a packaged name (GGUFs are converted
    once), or an HF hub id. Extras: ``batch_size`` (rows per engine task), ``max_concurrent_batches``
    (tasks in flight per engine), ``max_num_seqs``, ``enforce_eager`` (skip CUDA-graph capture: faster
    start, slower decode), ``chars_per_token`` (free-text bound of a constraint), ``engine_extra`` (more
    vLLM engine kwargs), ``model_cache_dir`` (converted GGUFs)."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, replicas: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 4096, *, batch_size: int = 64,
                 max_concurrent_batches: int = 8, max_num_seqs: int | None = None, enforce_eager: bool = False,
                 chars_per_token: int = 4, engine_extra: dict[str, Any] | None = None,
                 model_cache_dir: str | None = None) -> None:
        if tensor_parallel_size < 1 or replicas < 1:
            raise VLLMError("llm.tensor_parallel_size and llm.replicas must be >= 1")
        if not 0 < gpu_memory_utilization <= 1:
            raise VLLMError("llm.gpu_memory_utilization must be in (0, 1]")
        resolved = resolve_model(model)
        check_vllm_installed()
        self.model_id = model_id_for(model)
        source = resolved.source
        if resolved.gguf is not None:
            source = str(convert_gguf(resolved.gguf, Path(model_cache_dir).expanduser() if model_cache_dir else None))
        self.model_source = source
        self.tensor_parallel_size = tensor_parallel_size
        self.replicas = replicas
        self.max_model_len = max_model_len
        self.batch_size = batch_size
        self.chars_per_token = chars_per_token
        self.engine = engine_kwargs(tensor_parallel_size, gpu_memory_utilization, max_model_len, max_num_seqs,
                                    enforce_eager, engine_extra)
        self.config_kwargs = processor_config_kwargs(source, self.engine, replicas, batch_size, max_concurrent_batches)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=resolved.local)
        self.eos_ids = eos_token_ids(self.tokenizer.eos_token_id, Path(source) if resolved.local else None)
        self._processor: Any = None
        self._score_processor: Any = None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def processor(self) -> Any:
        """The ``ray.data.llm`` processor, built once (starting no engine: engines start per job)."""
        if self._processor is None:
            from ray.data.llm import build_processor, vLLMEngineProcessorConfig

            wait_for_gpus(self.tensor_parallel_size)
            config = vLLMEngineProcessorConfig(**self.config_kwargs)
            self._processor = build_processor(
                config, postprocess=functools.partial(postprocess_row, eos_ids=self.eos_ids))
        return self._processor

    def score_processor(self) -> Any:
        """The ``ray.data.llm`` processor of :meth:`score` (its own postprocess), built once."""
        if self._score_processor is None:
            self.processor()  # initialises Ray and checks the GPUs
            from ray.data.llm import build_processor, vLLMEngineProcessorConfig

            config = vLLMEngineProcessorConfig(**self.config_kwargs)
            self._score_processor = build_processor(config, postprocess=postprocess_score_row)
        return self._score_processor

    def score(self, conversations: list[Messages], continuations: list[str], prefill: str = "") -> list[float]:
        """Continuation log-probabilities (see :meth:`LLMBackend.score`) from vLLM's prompt logprobs, one Ray
        Data job (one engine start) per call: call it with every pair at once. Prompt and continuation are
        tokenized separately and concatenated, as the ``transformers`` backend does."""
        n = len(conversations)
        if n != len(continuations):
            raise ValueError(f"{n} conversations for {len(continuations)} continuations")
        if not n:
            return []
        import ray

        texts = [render_prompt(self.tokenizer, c, prefill) for c in conversations]
        prompt_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        cont_ids = [self.tokenizer.encode(c, add_special_tokens=False) if c else [] for c in continuations]
        rows = build_score_rows(prompt_ids, cont_ids, self.max_model_len)
        if not rows:
            return [0.0] * n
        ds = ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows), self.batch_size, self.replicas))
        return collect_scores(self.score_processor()(ds).take_all(), n)

    def generate(self, conversations: list[Messages], params: GenerationParams, prefill: str = "",
                 constraint: Constraint = None) -> list[Generation]:
        n = len(conversations)
        return self.generate_each(conversations, [params] * n, [prefill] * n, per_row(constraint, n))

    def generate_each(self, conversations: list[Messages], params: Sequence[GenerationParams],
                      prefills: Sequence[str], constraints: Sequence[Template | None]) -> list[Generation]:
        """Like :meth:`generate` with sampling settings, prefill and constraint given per conversation: one
        Ray Data job (one engine start) for rows that ``generate`` would need several calls for."""
        n = len(conversations)
        if not (len(params) == len(prefills) == len(constraints) == n):
            raise ValueError("generate_each needs one params, prefill and constraint per conversation")
        if not n:
            return []
        import ray

        texts = [render_prompt(self.tokenizer, c, p) for c, p in zip(conversations, prefills, strict=True)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        sampling = [sampling_params_dict(p, c, self.chars_per_token) for p, c in zip(params, constraints, strict=True)]
        rows = build_rows(ids, sampling, self.max_model_len)
        processor = self.processor()
        ds = ray.data.from_items(rows, override_num_blocks=num_blocks(n, self.batch_size, self.replicas))
        return collect_generations(processor(ds).take_all(), n)


__all__ = ["INSTALL_HINT", "ResolvedModel", "VLLMBackend", "VLLMError", "build_rows", "build_score_rows",
           "check_vllm_installed", "collect_generations", "collect_scores",
           "continuation_logprob", "convert_gguf", "engine_kwargs", "eos_token_ids", "model_id_for", "num_blocks",
           "postprocess_row", "postprocess_score_row", "processor_config_kwargs", "render_prompt", "resolve_model",
           "sampling_params_dict", "score_sampling_params", "wait_for_gpus"]
