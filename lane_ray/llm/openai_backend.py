"""``openai`` backend: chat completions from any OpenAI-compatible server the user hosts (``vllm serve``, the
Ray Serve LLM app, or :mod:`lane_ray.llm.openai_server`), sent concurrently with the standard library.

Request body (one per conversation, ``n = 1``)::

    {"model": ..., "messages": [...], "max_tokens": ..., "temperature": ..., "top_p": ..., "seed": ...,
     "stop": [...],                                  # only when params.stop is set
     "continue_final_message": true,                 # only with a prefill: the prefill is the last
     "add_generation_prompt": false,                 #   message, role "assistant" (vLLM extension)
     "structured_outputs": {"regex": ...},           # with a constraint (vLLM >= 0.12; older: guided_regex)
     "lane_template": "{\"segments\": [...]}"}       # with a constraint: the Template as a JSON string
                                                     #   (our server; see template_to_json)

The returned ``content`` is the continuation after the prefill (vLLM returns only new text unless ``echo``
is set, which we never send). Which constraint fields go out is ``constraint_mode``: ``both`` (default: vLLM
and Ray Serve LLM ignore ``lane_template`` with a warning, our server ignores ``structured_outputs``),
``structured_outputs``, ``guided_regex`` (vLLM < 0.12), ``lane_template`` or ``none`` (no constraint is sent;
the caller's parser and repair must cope). The hosted OpenAI API rejects all of these extensions.

Errors are :class:`LLMServerError` (a :class:`~lane_ray.errors.LaneError`): one line naming the URL and the
problem. HTTP 429/500/502/503/504 and dropped connections are retried ``max_retries`` times with exponential
backoff (``Retry-After`` honoured up to 30 s); a refused connection, a timeout, another 4xx or a malformed
body fails at once.

Scoring (:meth:`OpenAIBackend.score`) uses the completions endpoint, ``<base>/completions``, one request per
(conversation, continuation)::

    {"model": ..., "prompt": "<rendered prompt><prefill><continuation>", "max_tokens": 1, "temperature": 0,
     "echo": true, "logprobs": 1}

The server echoes the prompt with ``choices[0].logprobs`` (``tokens``, ``token_logprobs``, ``text_offset``: the
legacy completions format of vLLM, llama.cpp's server and our own); the score is the sum of the logprobs of
the tokens that end after the rendered prompt and begin before the end of the continuation. The completions
endpoint takes text, so the chat template is applied here: ChatML (``<|im_start|>role\ncontent<|im_end|>``,
the template of SmolLM2 and Qwen) unless ``score_tokenizer`` names a local tokenizer (HF directory, .gguf or
packaged name) whose template to use. A server without that endpoint or without prompt logprobs fails with an
:class:`LLMServerError` that says so.

Batch work through ``ray.data.llm`` (:func:`build_openai_http_processor`). Ray 2.60's
``HttpRequestProcessorConfig`` + ``build_processor`` POSTs any JSON payload, so it carries exactly the bodies
above (:func:`chat_request_body`). What it does not do, and what to know before choosing it over an actor
that calls :class:`OpenAIBackend`:

- Inside one batch the requests go out **one after another**: ``HttpRequestUDF.udf`` creates every
  ``session.post(...)`` first but awaits them in a loop, and aiohttp sends a request only when it is awaited.
  Parallelism comes from the actor pool (``concurrency``) and from Ray Data running several batches per
  async actor; keep ``batch_size`` small (1-8). :class:`OpenAIBackend` instead keeps ``max_concurrency``
  requests in flight, which lets a server batch them.
- Retries cover 408/429/502/503/504 and connection errors, not HTTP 500. A non-retryable error whose body is
  JSON (vLLM's 400s, ours) comes back as a row; the postprocess here turns it into :class:`LLMServerError`.
  A non-JSON error body raises aiohttp's ``ContentTypeError`` inside the stage; exhausted retries raise a
  ``RuntimeError`` carrying the whole payload and a traceback: neither is a one-line error.
- One ``params``/``prefill``/``constraint`` per processor (they are the processor's arguments, not columns);
  rows differ only in their messages. Per-row prefills (preference retry rounds) need one processor per
  round or the actor path.
- ``payload`` travels as an Arrow struct: rows of one dataset must have the same keys (they do here), and
  nested lists of differently-shaped objects would come back with null-filled keys and nullable ints as
  floats, which is why ``lane_template`` is a JSON string.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from http.client import HTTPException, RemoteDisconnected
from typing import Any

from lane_ray.errors import ConfigError, LaneError
from lane_ray.llm.backend import (
    Choice,
    Constraint,
    FreeText,
    Generation,
    GenerationParams,
    Messages,
    Template,
    Text,
    per_row,
)

CONSTRAINT_MODES = ("both", "structured_outputs", "guided_regex", "lane_template", "none")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_EXCERPT_CHARS = 200


class LLMServerError(LaneError):
    """The OpenAI-compatible server was unreachable, timed out, or answered with an error or garbage."""


# --- the Template on the wire -------------------------------------------------------------------------------


def template_to_json(t: Template) -> dict[str, Any]:
    """``{"segments": [{"type": "text", "text": ...} | {"type": "free_text", "min_tokens": .., "max_tokens": ..,
    "forbid": ".." (only when set)} | {"type": "choice", "options": [...]}, ...]}``: the ``lane_template``
    request field."""
    segs: list[dict[str, Any]] = []
    for seg in t.segments:
        if isinstance(seg, Text):
            segs.append({"type": "text", "text": seg.text})
        elif isinstance(seg, FreeText):
            d: dict[str, Any] = {"type": "free_text", "min_tokens": seg.min_tokens, "max_tokens": seg.max_tokens}
            if getattr(seg, "forbid", ""):
                d["forbid"] = seg.forbid
            segs.append(d)
        else:
            segs.append({"type": "choice", "options": list(seg.options)})
    return {"segments": segs}


def template_from_json(obj: Any) -> Template:
    """Inverse of :func:`template_to_json`; also accepts the JSON text. Keys a segment's type does not use
    are ignored (Arrow fills them with nulls when a payload crosses Ray Data). Raises ``ValueError`` naming
    the segment at fault."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), (list, tuple)):
        raise ValueError('expected an object {"segments": [...]}')
    segs: list[Text | FreeText | Choice] = []
    for i, s in enumerate(obj["segments"]):
        kind = s.get("type") if isinstance(s, dict) else None
        try:
            if kind == "text" and isinstance(s.get("text"), str):
                segs.append(Text(s["text"]))
            elif kind == "free_text":
                lo, hi = s.get("min_tokens", 1), s.get("max_tokens", 16)
                if not (isinstance(lo, int) and isinstance(hi, int)) or isinstance(lo, bool) or hi > 4096:
                    raise ValueError("min_tokens/max_tokens must be integers (max_tokens <= 4096)")
                forbid = s.get("forbid") or ""
                if not isinstance(forbid, str):
                    raise ValueError("forbid must be a string")
                segs.append(FreeText(lo, hi, forbid=forbid) if forbid else FreeText(lo, hi))
            elif kind == "choice" and isinstance(s.get("options"), (list, tuple)) \
                    and all(isinstance(o, str) for o in s["options"]):
                segs.append(Choice(tuple(s["options"])))
            else:
                raise ValueError("expected type text (with text), free_text or choice (with options)")
        except ValueError as e:
            raise ValueError(f"segment {i}: {e}") from None
    return Template(tuple(segs))


# --- request bodies -----------------------------------------------------------------------------------------


def chat_completions_url(base_url: str | None) -> str:
    """``<base>/chat/completions`` for a base URL such as ``http://127.0.0.1:8000/v1`` (a bare
    ``http://host:port`` gets ``/v1``; a URL already ending in ``/chat/completions`` is kept)."""
    if not base_url:
        raise ConfigError("config field 'llm.base_url': required for llm.backend=openai "
                          "(e.g. http://127.0.0.1:8000/v1)")
    parts = urllib.parse.urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"config field 'llm.base_url': '{base_url}' is not an http(s) URL "
                          "(e.g. http://127.0.0.1:8000/v1)")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    if not path:
        path = "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path + "/chat/completions", "", ""))


def chat_request_body(model: str, messages: Messages, params: GenerationParams, prefill: str = "",
                      constraint: Template | None = None, constraint_mode: str = "both") -> dict[str, Any]:
    """The chat-completions body for one conversation (see the module docstring for each field)."""
    if constraint_mode not in CONSTRAINT_MODES:
        raise ConfigError(f"constraint_mode '{constraint_mode}': choose from {', '.join(CONSTRAINT_MODES)}")
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    body: dict[str, Any] = {"model": model, "messages": msgs, "n": 1, "max_tokens": params.max_new_tokens,
                            "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.stop:
        body["stop"] = list(params.stop)
    if prefill:
        msgs.append({"role": "assistant", "content": prefill})
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if constraint is not None and constraint_mode != "none":
        if constraint_mode in ("both", "structured_outputs"):
            body["structured_outputs"] = {"regex": constraint.to_regex()}
        elif constraint_mode == "guided_regex":
            body["guided_regex"] = constraint.to_regex()
        if constraint_mode in ("both", "lane_template"):
            # a JSON string, not a nested object: Ray Data would turn the segments into one Arrow struct
            # type with nulls (and nullable ints into floats) on the way to the HTTP stage
            body["lane_template"] = json.dumps(template_to_json(constraint), ensure_ascii=False,
                                               separators=(",", ":"))
    return body


def completions_url(base_url: str | None) -> str:
    """``<base>/completions`` for the same base URL as :func:`chat_completions_url`."""
    chat = chat_completions_url(base_url)
    return chat[: -len("/chat/completions")] + "/completions"


def render_chatml(conversation: Messages, prefill: str = "") -> str:
    """A conversation in ChatML with the assistant header open, then ``prefill``: what SmolLM2's and Qwen's
    chat templates render for ``add_generation_prompt=True`` (without a default system prompt)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation)
    return f"{turns}<|im_start|>assistant\n{prefill}"


def score_request_body(model: str, prompt: str, continuation: str) -> dict[str, Any]:
    """The completions body that scores ``continuation`` after the rendered ``prompt`` (module docstring)."""
    return {"model": model, "prompt": prompt + continuation, "max_tokens": 1, "temperature": 0.0, "echo": True,
            "logprobs": 1}


NO_PROMPT_LOGPROBS = ("does not return prompt logprobs (score() needs POST /completions with echo and logprobs, "
                      "as vllm serve provides)")


def parse_score_response(resp: Any, prompt_chars: int, total_chars: int, url: str) -> float:
    """Sum of the logprobs of the echoed tokens overlapping characters ``[prompt_chars, total_chars)`` (the
    continuation) of a completions response; :class:`LLMServerError` when it carries no prompt logprobs."""
    if isinstance(resp, dict) and resp.get("error") is not None and resp.get("choices") is None:
        raise LLMServerError(f"LLM server {url}: error response: {_excerpt(resp['error'])}")
    try:
        lp = resp["choices"][0]["logprobs"]
        tokens, logprobs, offsets = lp["tokens"], lp["token_logprobs"], lp["text_offset"]
        if not (isinstance(tokens, list) and isinstance(logprobs, list) and isinstance(offsets, list)):
            raise TypeError("not lists")
    except (KeyError, IndexError, TypeError):
        raise LLMServerError(f"LLM server {url}: {NO_PROMPT_LOGPROBS}; got {_excerpt(resp)}") from None
    if not tokens or len(tokens) != len(logprobs) or len(tokens) != len(offsets):
        raise LLMServerError(f"LLM server {url}: {NO_PROMPT_LOGPROBS}; got {len(tokens)} tokens, "
                             f"{len(logprobs)} logprobs, {len(offsets)} offsets")
    if offsets[-1] + len(tokens[-1]) < total_chars:
        raise LLMServerError(f"LLM server {url}: {NO_PROMPT_LOGPROBS}: the prompt was not echoed (echo=true)")
    total = 0.0
    for tok, lp_, off in zip(tokens, logprobs, offsets, strict=True):
        if off + len(tok) > prompt_chars and off < total_chars:
            if lp_ is None:
                raise LLMServerError(f"LLM server {url}: {NO_PROMPT_LOGPROBS}: no logprob for token {tok!r}")
            total += float(lp_)
    return total


def parse_chat_response(resp: Any, url: str) -> Generation:
    """A :class:`Generation` from a decoded chat-completions response; :class:`LLMServerError` when the
    response is an error object or lacks ``choices[0].message.content``."""
    if isinstance(resp, dict) and resp.get("error") is not None and resp.get("choices") is None:
        raise LLMServerError(f"LLM server {url}: error response: {_excerpt(resp['error'])}")
    try:
        choice = resp["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not a string")
    except (KeyError, IndexError, TypeError) as e:
        raise LLMServerError(f"LLM server {url}: malformed response (no choices[0].message.content: "
                             f"{type(e).__name__}): {_excerpt(resp)}") from None
    usage = resp.get("usage") or {}
    new_tokens = usage.get("completion_tokens")
    extra = {"prompt_tokens": usage["prompt_tokens"]} if usage.get("prompt_tokens") is not None else {}
    return Generation(text=text, new_tokens=int(new_tokens) if new_tokens is not None else 0,
                      finish_reason=str(choice.get("finish_reason") or "stop"), extra=extra)


def _excerpt(obj: Any) -> str:
    if isinstance(obj, bytes):
        obj = obj.decode("utf-8", "replace")
    if isinstance(obj, dict) and set(obj) & {"message", "detail"}:
        obj = obj.get("message") or obj.get("detail")
    elif isinstance(obj, dict) and isinstance(obj.get("error"), dict) and obj["error"].get("message"):
        obj = obj["error"]["message"]
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


def _error_body_excerpt(raw: bytes) -> str:
    try:
        return _excerpt(json.loads(raw))
    except (ValueError, UnicodeDecodeError):
        return _excerpt(raw) or "(empty body)"


def api_key_headers(api_key_env: str) -> dict[str, str]:
    """``Authorization: Bearer <key>`` when the environment variable is set and non-empty, else nothing."""
    key = os.environ.get(api_key_env, "").strip() if api_key_env else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


# --- the backend --------------------------------------------------------------------------------------------


class OpenAIBackend:
    """Chat generation on an OpenAI-compatible server: one request per conversation, at most
    ``max_concurrency`` in flight, results in input order. ``base_url`` e.g. ``http://127.0.0.1:8000/v1``;
    the API key is read from ``api_key_env`` when the backend is constructed (optional)."""

    def __init__(self, model: str, base_url: str | None, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_concurrency: int = 8, constraint_mode: str = "both",
                 max_retries: int = 3, retry_backoff_s: float = 0.5, score_tokenizer: str | None = None) -> None:
        self.url = chat_completions_url(base_url)
        self.completions_url = completions_url(base_url)
        self.score_tokenizer = score_tokenizer
        self._tokenizer: Any = None
        if constraint_mode not in CONSTRAINT_MODES:
            raise ConfigError(f"constraint_mode '{constraint_mode}': choose from {', '.join(CONSTRAINT_MODES)}")
        if timeout_s <= 0 or max_concurrency < 1 or max_retries < 0:
            raise ConfigError("openai backend: need timeout_s > 0, max_concurrency >= 1, max_retries >= 0")
        self.model = model
        self.base_url = base_url
        self.model_id = f"{model}@{base_url}"  # = lane_ray.llm.model_identity for the same config
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.constraint_mode = constraint_mode
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        **api_key_headers(api_key_env)}
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # a proxy from the environment must never see requests to a server on this machine
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def generate(self, conversations: list[Messages], params: GenerationParams, prefill: str = "",
                 constraint: Constraint = None) -> list[Generation]:
        if not conversations:
            return []
        bodies = [chat_request_body(self.model, c, params, prefill, t, self.constraint_mode)
                  for c, t in zip(conversations, per_row(constraint, len(conversations)), strict=True)]
        if len(bodies) == 1:
            return [self._complete(bodies[0])]
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(bodies)),
                                  thread_name_prefix="lane-openai")
        try:
            futures = [pool.submit(self._complete, b) for b in bodies]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:  # the first failure in input order, not in completion order
                if f in done and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def render(self, conversation: Messages, prefill: str = "") -> str:
        """The prompt text of :meth:`score`: ChatML, or ``score_tokenizer``'s chat template when set."""
        if self.score_tokenizer is None:
            return render_chatml(conversation, prefill)
        if self._tokenizer is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            from lane_ray.llm.transformers_backend import locate_llm

            folder, gguf = locate_llm(self.score_tokenizer)
            kw = {"gguf_file": gguf} if gguf else {}
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
        text = self._tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def score(self, conversations: list[Messages], continuations: list[str], prefill: str = "") -> list[float]:
        """Continuation log-probabilities (see :meth:`LLMBackend.score`) from the server's echoed prompt
        logprobs, ``max_concurrency`` requests in flight; an empty continuation scores 0.0 without a request."""
        if len(conversations) != len(continuations):
            raise ValueError(f"{len(conversations)} conversations for {len(continuations)} continuations")
        jobs = []
        for i, (c, cont) in enumerate(zip(conversations, continuations, strict=True)):
            if cont:
                prompt = self.render(c, prefill)
                jobs.append((i, score_request_body(self.model, prompt, cont), len(prompt), len(prompt) + len(cont)))
        out = [0.0] * len(conversations)
        if not jobs:
            return out

        def one(job: tuple[int, dict[str, Any], int, int]) -> float:
            _, body, lo, hi = job
            try:
                resp = self._post(json.dumps(body, ensure_ascii=False).encode(), self.completions_url)
            except LLMServerError as e:
                if any(f"HTTP {code}" in str(e) for code in (400, 404, 405, 422, 501)):
                    raise LLMServerError(f"{e} (the server {NO_PROMPT_LOGPROBS})") from None
                raise
            return parse_score_response(resp, lo, hi, self.completions_url)

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)),
                                thread_name_prefix="lane-openai-score") as pool:
            for (i, *_), value in zip(jobs, pool.map(one, jobs), strict=True):
                out[i] = value
        return out

    def _complete(self, body: dict[str, Any]) -> Generation:
        return parse_chat_response(self._post(json.dumps(body, ensure_ascii=False).encode()), self.url)

    def _post(self, data: bytes, url: str | None = None) -> Any:
        """POST with retries (to ``url``, default the chat-completions URL); the decoded JSON response."""
        url = url or self.url
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                req = urllib.request.Request(url, data=data, headers=self.headers, method="POST")
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise LLMServerError(f"LLM server {url}: malformed response (not JSON): "
                                         f"{_excerpt(raw) or '(empty body)'}") from None
            except urllib.error.HTTPError as e:
                raw = _read_quietly(e)
                problem = f"HTTP {e.code}: {_error_body_excerpt(raw)}"
                if e.code not in RETRY_STATUS:
                    raise LLMServerError(f"LLM server {url}: {problem}") from None
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, ConnectionRefusedError):
                    raise LLMServerError(f"LLM server {url}: connection refused (is the server running? "
                                         "check llm.base_url)") from None
                if isinstance(reason, TimeoutError):
                    raise self._timeout_error(url) from None
                if isinstance(reason, socket.gaierror):
                    raise LLMServerError(f"LLM server {url}: cannot resolve host ({reason})") from None
                if not isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
                    raise LLMServerError(f"LLM server {url}: cannot connect ({reason})") from None
                problem = f"connection dropped ({type(reason).__name__})"
            except TimeoutError:
                raise self._timeout_error(url) from None
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, RemoteDisconnected) as e:
                problem = f"connection dropped ({type(e).__name__})"
            except (HTTPException, OSError) as e:
                raise LLMServerError(f"LLM server {url}: {type(e).__name__}: {e}") from None
            if attempt >= self.max_retries:
                raise LLMServerError(f"LLM server {url}: {problem} (after {attempt + 1} attempts)")
            backoff = self.retry_backoff_s * 2**attempt * (1 + 0.25 * random.random())
            time.sleep(max(backoff, min(retry_after or 0.0, 30.0)))
            attempt += 1

    def _timeout_error(self, url: str | None = None) -> LLMServerError:
        return LLMServerError(f"LLM server {url or self.url}: no response within {self.timeout_s:g} s "
                              "(llm.timeout_s)")


def _read_quietly(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read(64 * 1024)
    except (OSError, HTTPException):
        return b""


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


# --- batch work through ray.data.llm ------------------------------------------------------------------------


def build_openai_http_processor(model: str, base_url: str, params: GenerationParams, prefill: str = "",
                                constraint: Template | None = None, *, constraint_mode: str = "both",
                                api_key_env: str = "OPENAI_API_KEY", messages_column: str = "messages",
                                batch_size: int = 4, concurrency: int | tuple[int, int] = 1,
                                max_retries: int = 3, timeout_s: float = 120.0, qps: int | None = None,
                                num_cpus: float | None = None) -> Any:
    """A ``ray.data.llm`` processor sending :func:`chat_request_body` for each row's ``messages_column``
    (a list of ``{"role", "content"}``) to the server. Output rows keep the input columns and add
    ``generated_text``, ``new_tokens`` and ``finish_reason``; an error response raises
    :class:`LLMServerError` in the postprocess. See the module docstring for what the processor cannot do.
    ``num_cpus`` per HTTP actor (e.g. 0.25): the actors only wait on sockets."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    url = chat_completions_url(base_url)
    chat_request_body(model, [], params, prefill, constraint, constraint_mode)  # validate before Ray runs
    stage: dict[str, Any] = {"num_cpus": num_cpus} if num_cpus is not None else {}
    config = HttpRequestProcessorConfig(
        url=url, headers=api_key_headers(api_key_env), batch_size=batch_size, concurrency=concurrency,
        qps=qps, max_retries=max_retries, base_retry_wait_time_in_s=0.5,
        session_factory=partial(_aiohttp_session, timeout_s), http_request_stage=stage or True,
    )
    return build_processor(
        config,
        preprocess=partial(_http_preprocess, model, params, prefill, constraint, constraint_mode, messages_column),
        postprocess=partial(_http_postprocess, url),
    )


def _aiohttp_session(timeout_s: float) -> Any:
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))


def _http_preprocess(model: str, params: GenerationParams, prefill: str, constraint: Template | None,
                     constraint_mode: str, messages_column: str, row: dict[str, Any]) -> dict[str, Any]:
    messages = [dict(m) for m in row[messages_column]]  # Arrow hands back dicts in a list or an ndarray
    return {"payload": chat_request_body(model, messages, params, prefill, constraint, constraint_mode)}


def _http_postprocess(url: str, row: dict[str, Any]) -> dict[str, Any]:
    gen = parse_chat_response(_plain(row["http_response"]), url)
    out = {k: v for k, v in row.items() if k not in ("payload", "http_response")}
    out.update(generated_text=gen.text, new_tokens=gen.new_tokens, finish_reason=gen.finish_reason)
    return out


def _plain(obj: Any) -> Any:
    """Arrow/numpy containers back to dicts and lists."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ndarray":
        return [_plain(v) for v in obj]
    return obj


__all__ = ["CONSTRAINT_MODES", "LLMServerError", "NO_PROMPT_LOGPROBS", "OpenAIBackend", "api_key_headers",
           "build_openai_http_processor", "chat_completions_url", "chat_request_body", "completions_url",
           "parse_chat_response", "parse_score_response", "render_chatml", "score_request_body",
           "template_from_json", "template_to_json"]
