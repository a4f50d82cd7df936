"""``openai`` backend: chat completions from an OpenAI-compatible server the user hosts (llama.cpp's
``python -m llama_cpp.server`` or ``llama-server``, ``vllm serve``, the Ray Serve LLM app), sent with the official
``openai`` client (keep-alive connections, its retries with exponential backoff and ``Retry-After``).

Request body (one per conversation, ``n = 1``)::

    {"model": ..., "messages": [...], "max_tokens": ..., "temperature": ..., "top_p": ..., "seed": ...,
     "stop": [...],                                   # only when params.stop is set
     "frequency_penalty": ...,                        # only when set
     <the constraint, in the request's form>}

**Constraint formats** (``constraint_format``, the config's ``llm.constraint_format``). The output template
(:class:`~lane_ray.llm.backend.Template`) goes out in one of these forms:

- ``json_schema``: ``"response_format": {"type": "json_schema", "json_schema": {"name": "lane_reply", "schema":
  ..., "strict": true}}`` (OpenAI structured outputs: vLLM, llama.cpp's ``llama-server``), the schema from
  :meth:`Template.to_json_schema` of prefill + template. llama-cpp-python's server refuses that type and takes
  ``"response_format": {"type": "json_object", "schema": ...}`` instead (wire form ``json_object``): with
  ``json_schema`` the backend sends one small probe request first and, when the server refuses the
  ``json_schema`` type (an HTTP 400/422, or llama-cpp-python's HTTP 500 naming ``response_format``), uses
  ``json_object`` from then on (remembered per backend instance, logged in one line). A template that is not
  JSON-shaped cannot be expressed this way: :class:`ConfigError`.
- ``grammar``: ``"grammar": "<GBNF>"`` (llama.cpp's servers), from :meth:`Template.to_gbnf` of prefill + template.
- ``regex``: ``"structured_outputs": {"regex": ...}`` (vLLM >= 0.12), :meth:`Template.to_regex` of the template;
  the prefill goes as a final assistant message with ``"continue_final_message": true,
  "add_generation_prompt": false`` (vLLM continues it and returns only the new text).
- ``none``: no constraint; the caller's parser, repair and re-sampling cope.
- ``auto`` (default): before the first constrained request, one probe request per form, in the order
  ``json_schema``, ``json_object``, ``grammar``, ``regex``, each with a small template whose output no model
  writes unprompted (:data:`PROBE`). A form is skipped when the server refuses it (HTTP 400/422, or an error
  naming the form's field) or ignores it (the reply does not follow the probe template: servers that drop
  unknown fields); the first form the server enforces is used for every later request of this backend instance
  and logged in one line. A row whose template is not JSON-shaped uses the first enforced of ``grammar`` and
  ``regex``. When the server enforces no form, :class:`LLMServerError` says so: ``auto`` never falls back to
  unconstrained replies silently (set ``none`` for that).

**Prefill.** llama-cpp-python's server and the OpenAI API cannot continue a prefilled assistant turn (they close
it and open a new one, so the model repeats it). With ``json_schema``, ``json_object``, ``grammar`` and
``none`` the prefill is therefore not sent: the constraint covers prefill + template, ``max_tokens`` is raised
by the prefill's length in characters (plus slack for the layout a schema leaves free), and the prefill is
stripped from the reply, so :attr:`Generation.text` is still the text after the prefill. A reply that is one
JSON value is re-serialised first (``json.dumps``: one space after ``,`` and ``:``, the templates' layout;
llama.cpp's schema grammars allow a space around each token). A reply that does not start with the prefill even
so is returned whole; the callers' parsers find the JSON value in it. Only ``regex`` (vLLM) sends
the prefill with ``continue_final_message``. ``Generation.extra["constraint_format"]`` records the form used.

Errors are :class:`LLMServerError` (a :class:`~lane_ray.errors.LaneError`): one line naming the URL and the
problem. The client retries HTTP 408/409/429/5xx, timeouts and failed connections ``max_retries`` times
(exponential backoff from 0.5 s, ``Retry-After`` honoured); another 4xx or a malformed body fails at once.
``timeout_s`` bounds each attempt.

Scoring (:meth:`OpenAIBackend.score`) uses the completions endpoint, ``<base>/completions``, one request per
(conversation, continuation)::

    {"model": ..., "prompt": "<rendered prompt><prefill><continuation>", "max_tokens": 1, "temperature": 0,
     "echo": true, "logprobs": 1}

The server echoes the prompt with ``choices[0].logprobs`` (``tokens``, ``token_logprobs``, ``text_offset``: the
legacy completions format of vLLM and llama-cpp-python's server); the score is the sum of the logprobs of the
tokens that end after the rendered prompt and begin before the end of the continuation. The completions
endpoint takes text, so the chat template is applied here: ChatML (``<|im_start|>role\\ncontent<|im_end|>``,
the template of SmolLM2 and Qwen) unless ``score_tokenizer`` names a local tokenizer (HF directory, .gguf or
packaged name) whose template to use. A server without that endpoint or without prompt logprobs fails with an
:class:`LLMServerError` that says so.

Batch work through ``ray.data.llm`` (:func:`build_openai_http_processor`). Ray 2.60's
``HttpRequestProcessorConfig`` + ``build_processor`` POSTs any JSON payload, so it carries exactly the bodies
above (:func:`chat_request_body`, the form resolved once on the driver by the same probe). What it does not do,
and what to know before choosing it over an actor that calls :class:`OpenAIBackend`:

- Inside one batch the requests go out **one after another**: ``HttpRequestUDF.udf`` creates every
  ``session.post(...)`` first but awaits them in a loop, and aiohttp sends a request only when it is awaited.
  Parallelism comes from the actor pool (``concurrency``) and from Ray Data running several batches per
  async actor; keep ``batch_size`` small (1-8). :class:`OpenAIBackend` instead keeps ``max_concurrency``
  requests in flight, which lets a server batch them.
- Retries cover 408/429/502/503/504 and connection errors, not HTTP 500. A non-retryable error whose body is
  JSON comes back as a row; the postprocess here turns it into :class:`LLMServerError`. A non-JSON error body
  raises aiohttp's ``ContentTypeError`` inside the stage; exhausted retries raise a ``RuntimeError`` carrying
  the whole payload and a traceback: neither is a one-line error.
- One ``params``/``prefill``/``constraint`` per processor (they are the processor's arguments, not columns);
  rows differ only in their messages. Per-row prefills (preference retry rounds) need one processor per
  round or the actor path.
- ``payload`` travels as an Arrow struct: rows of one dataset must have the same keys (they do here), and
  nested objects of different shapes would come back with null-filled keys, which is why the JSON schema
  travels as a JSON string inside the payload and is decoded by the preprocess.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
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
    UnsupportedTemplate,
    per_row,
)

# the values of llm.constraint_format
CONSTRAINT_FORMATS = ("auto", "json_schema", "grammar", "regex", "none")
# what one request carries: the formats above less auto, plus llama-cpp-python's response_format json_object
WIRE_FORMS = ("json_schema", "json_object", "grammar", "regex", "none")
# the order auto probes the forms in; a template that is not JSON-shaped uses the first enforced of TEXT_FORMS
AUTO_ORDER = ("json_schema", "json_object", "grammar", "regex")
TEXT_FORMS = ("grammar", "regex")
JSON_FORMS = ("json_schema", "json_object")
# request fields of each form: an error that names one of them is a refusal of the form
FORM_FIELDS = {"json_schema": ("response_format", "json_schema"), "json_object": ("response_format", "json_object"),
               "grammar": ("grammar",), "regex": ("structured_outputs", "regex")}
SCHEMA_NAME = "lane_reply"
# statuses the openai client retries (and connection failures, timeouts)
RETRIED_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_EXCERPT_CHARS = 200
# request fields the openai client takes as typed arguments; every other field goes in extra_body
_TYPED_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop", "n", "frequency_penalty")

# The probe of constraint_format=auto: a reply no model writes unprompted (an x-run after "qz"), which only a
# server that enforces the form returns. It exercises what the real templates need: a choice and a bounded
# character class inside a JSON string after a prefill.
PROBE_PREFILL = '{"lane_probe": "'
PROBE = Template((Choice(("qz",)), FreeText(1, 2, chars="x"), Text('"}')))
PROBE_MESSAGES = [{"role": "user", "content": "Say hello."}]


class LLMServerError(LaneError):
    """The OpenAI-compatible server was unreachable, timed out, or answered with an error or garbage."""


class _StatusError(LLMServerError):
    """An HTTP error status; carries the status and the body's excerpt (refusal checks read them)."""

    def __init__(self, message: str, status: int, excerpt: str) -> None:
        super().__init__(message)
        self.status = status
        self.excerpt = excerpt


# --- request bodies -----------------------------------------------------------------------------------------


def resolve_base_url(base_url: str | None) -> str | None:
    """``base_url``, or ``$OPENAI_BASE_URL`` when it is unset or empty."""
    return base_url or os.environ.get("OPENAI_BASE_URL") or None


def chat_completions_url(base_url: str | None) -> str:
    """``<base>/chat/completions`` for a base URL such as ``http://127.0.0.1:8000/v1`` (a bare
    ``http://host:port`` gets ``/v1``; a URL already ending in ``/chat/completions`` is kept)."""
    if not base_url:
        raise ConfigError("config field 'llm.base_url': required for llm.backend=openai "
                          "(e.g. http://127.0.0.1:8000/v1, or set OPENAI_BASE_URL)")
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


def api_root(base_url: str | None) -> str:
    """The API root the client is given (``http://host:port/v1``)."""
    return chat_completions_url(base_url)[: -len("/chat/completions")]


def completions_url(base_url: str | None) -> str:
    """``<base>/completions`` for the same base URL as :func:`chat_completions_url`."""
    return api_root(base_url) + "/completions"


def _check_form(form: str) -> None:
    if form not in WIRE_FORMS:
        raise ConfigError(f"constraint form '{form}': choose from {', '.join(WIRE_FORMS)} "
                          f"(llm.constraint_format takes {', '.join(CONSTRAINT_FORMATS)})")


def prefill_in_messages(form: str) -> bool:
    """Whether requests of this form send the prefill as a continued assistant message (vLLM's
    ``continue_final_message``): only ``regex``; the others constrain prefill + template instead."""
    return form == "regex"


def chat_request_body(model: str, messages: Messages, params: GenerationParams, prefill: str = "",
                      constraint: Template | None = None, form: str = "none") -> dict[str, Any]:
    """The chat-completions body for one conversation in wire form ``form`` (one of :data:`WIRE_FORMS`; see the
    module docstring). Raises :class:`~lane_ray.llm.backend.UnsupportedTemplate` when ``form`` cannot express
    ``constraint`` (a JSON form for a template that is not JSON-shaped)."""
    _check_form(form)
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    max_tokens = params.max_new_tokens
    if prefill and not prefill_in_messages(form):
        # the prefill is generated too (at most one token per character), and a schema leaves the layout free
        max_tokens += len(prefill) + (16 if form in JSON_FORMS else 0)
    body: dict[str, Any] = {"model": model, "messages": msgs, "n": 1, "max_tokens": max_tokens,
                            "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.stop:
        body["stop"] = list(params.stop)
    if prefill and prefill_in_messages(form):
        msgs.append({"role": "assistant", "content": prefill})
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if constraint is None or form == "none":
        return body
    if form == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": SCHEMA_NAME, "schema": constraint.to_json_schema(prefill), "strict": True}}
    elif form == "json_object":
        body["response_format"] = {"type": "json_object", "schema": constraint.to_json_schema(prefill)}
    elif form == "grammar":
        body["grammar"] = constraint.to_gbnf(prefill)
    else:
        body["structured_outputs"] = {"regex": constraint.to_regex()}
    return body


def normalize_reply(text: str, prefill: str, form: str) -> tuple[str, bool]:
    """The reply as the text after ``prefill`` (the :class:`Generation` contract), and whether it started with
    the prefill. With ``regex`` the server continued the prefill: the text is already that. Otherwise a reply
    that is one JSON value is re-serialised (``json.dumps``: the templates' layout, whatever spacing the server
    chose) and the prefill stripped; any other reply loses the prefill when it starts with it. A reply that does
    not start with the prefill is returned whole (False)."""
    if not prefill or prefill_in_messages(form):
        return text, True
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            canonical = json.dumps(json.loads(stripped), ensure_ascii=False)
        except (ValueError, RecursionError):
            canonical = ""
        if canonical.startswith(prefill):
            return canonical[len(prefill):], True
    for t in (text, stripped):
        if t.startswith(prefill):
            return t[len(prefill):], True
    return text, False


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
                      "as vllm serve and llama-cpp-python's server provide)")


def parse_score_response(resp: Any, prompt_chars: int, total_chars: int, url: str) -> float:
    """Sum of the logprobs of the echoed tokens that overlap the continuation (characters ``[prompt_chars,
    total_chars)`` of the prompt sent) in a completions response; :class:`LLMServerError` when it carries no
    prompt logprobs.

    The continuation ends the prompt, so it is located from the end of the echoed prompt: the echoed tokens less
    the generated ones (``usage.completion_tokens``; without usage, those starting at or after ``total_chars``).
    That holds whether the server's ``text_offset`` counts the prompt as sent (vLLM) or without its special
    tokens (llama-cpp-python renders ``<|im_end|>`` as an empty token and leaves out the BOS token, here
    ``<|im_start|>``)."""
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
    usage = resp.get("usage") if isinstance(resp, dict) else None
    generated = (usage or {}).get("completion_tokens")
    if not isinstance(generated, int) or generated < 0 or generated > len(tokens):
        generated = sum(1 for off in offsets if off >= total_chars)
    n = len(tokens) - generated  # the echoed prompt's tokens
    end = offsets[n - 1] + len(tokens[n - 1]) if n else 0
    start = end - (total_chars - prompt_chars)
    if n == 0 or start < 0:
        raise LLMServerError(f"LLM server {url}: {NO_PROMPT_LOGPROBS}: the prompt was not echoed (echo=true)")
    total = 0.0
    for tok, lp_, off in zip(tokens[:n], logprobs[:n], offsets[:n], strict=True):
        if off + len(tok) > start:
            if lp_ is None:
                raise LLMServerError(f"LLM server {url}: {NO_PROMPT_LOGPROBS}: no logprob for token {tok!r}")
            total += float(lp_)
    return total


def parse_chat_response(resp: Any, url: str) -> Generation:
    """A :class:`Generation` from a decoded chat-completions response (the text as the server returned it);
    :class:`LLMServerError` when the response is an error object or lacks ``choices[0].message.content``."""
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


def api_key(api_key_env: str) -> str:
    """The API key: ``$<api_key_env>``, else ``$OPENAI_API_KEY``; empty when neither is set (no key is sent)."""
    key = os.environ.get(api_key_env, "").strip() if api_key_env else ""
    return key or os.environ.get("OPENAI_API_KEY", "").strip()


def api_key_headers(api_key_env: str) -> dict[str, str]:
    """``Authorization: Bearer <key>`` when :func:`api_key` finds one, else nothing."""
    key = api_key(api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _causes(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out and len(out) < 16:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _connection_problem(e: BaseException) -> str:
    """What went wrong with a connection, from the exception chain the client raised."""
    chain = _causes(e)
    text = " ".join(f"{type(c).__name__}: {c}" for c in chain)
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "Connection refused" in text \
            or "Errno 111" in text:
        return "connection refused (is the server running? check llm.base_url)"
    if "Name or service not known" in text or "nodename nor servname" in text or "Temporary failure in name" in text:
        return "cannot resolve host"
    for c in chain:
        name = type(c).__name__
        if name in ("RemoteProtocolError", "ReadError", "WriteError", "ConnectionResetError", "BrokenPipeError",
                    "ConnectionAbortedError", "RemoteDisconnected"):
            return f"connection dropped ({name})"
    root = chain[-1]
    return f"cannot connect ({type(root).__name__}: {' '.join(str(root).split())[:_EXCERPT_CHARS]})"


# --- the backend --------------------------------------------------------------------------------------------


class OpenAIBackend:
    """Chat generation on an OpenAI-compatible server: one request per conversation, at most
    ``max_concurrency`` in flight, results in input order. ``base_url`` e.g. ``http://127.0.0.1:8000/v1``
    (unset: ``$OPENAI_BASE_URL``); the API key is read from ``api_key_env`` (unset: ``$OPENAI_API_KEY``) when the
    backend is constructed (optional). ``constraint_format``: see the module docstring."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_concurrency: int = 8, constraint_format: str = "auto",
                 max_retries: int = 3, score_tokenizer: str | None = None) -> None:
        base_url = resolve_base_url(base_url)
        self.url = chat_completions_url(base_url)
        self.completions_url = completions_url(base_url)
        if constraint_format not in CONSTRAINT_FORMATS:
            raise ConfigError(f"config field 'llm.constraint_format': '{constraint_format}' is not one of "
                              f"{', '.join(CONSTRAINT_FORMATS)}")
        if timeout_s <= 0 or max_concurrency < 1 or max_retries < 0:
            raise ConfigError("openai backend: need timeout_s > 0, max_concurrency >= 1, max_retries >= 0")
        self.model = model
        self.base_url = base_url
        self.model_id = f"{model}@{base_url}"  # = lane_ray.llm.model_identity for the same config
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.constraint_format = constraint_format
        self.max_retries = int(max_retries)
        self.score_tokenizer = score_tokenizer
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        # per wire form: "enforced", "ignored: ...", "refused: ..." (probe results, for auto and json_schema)
        self.verdicts: dict[str, str] = {}
        self._resolved: dict[tuple[str, ...], str] = {}
        self._api_key = api_key(api_key_env)
        self._client = self._make_client()

    def _make_client(self) -> Any:
        import openai

        kwargs: dict[str, Any] = {}
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if host in _LOOPBACK and hasattr(openai, "DefaultHttpxClient"):
            # a proxy from the environment must never see requests to a server on this machine
            kwargs["http_client"] = openai.DefaultHttpxClient(trust_env=False)
        # without a key the client still wants one: a placeholder, whose header every request omits
        return openai.OpenAI(base_url=api_root(self.base_url), api_key=self._api_key or "unused",
                             timeout=self.timeout_s, max_retries=self.max_retries, **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # the client and its lock stay behind (Ray ships backends rarely)
        state = self.__dict__.copy()
        state["_client"] = state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._client = self._make_client()

    # -- choosing the wire form ------------------------------------------------------------------------------

    def form_for(self, template: Template | None, prefill: str = "") -> str:
        """The wire form a request with ``template`` after ``prefill`` goes out in (probing the server first where
        ``constraint_format`` needs it; see the module docstring)."""
        fmt = self.constraint_format
        if template is None or fmt == "none":
            return "regex" if fmt == "regex" else "none"
        if fmt in ("grammar", "regex"):
            return fmt
        json_ok = True
        try:
            template.to_json_schema(prefill)
        except UnsupportedTemplate as e:
            if fmt == "json_schema":
                raise ConfigError(f"config field 'llm.constraint_format': json_schema cannot express this output "
                                  f"template ({e}); use auto, grammar or regex") from None
            json_ok = False
        if fmt == "json_schema":
            return self._resolve(JSON_FORMS, require_enforced=False)
        return self._resolve(AUTO_ORDER if json_ok else TEXT_FORMS, require_enforced=True)

    def _resolve(self, order: tuple[str, ...], require_enforced: bool) -> str:
        """The first form of ``order`` the server enforces (``require_enforced``) or does not refuse, probing each
        form once per backend instance; logs the choice in one line."""
        with self._lock:
            if order in self._resolved:
                return self._resolved[order]
            for form in order:
                if form not in self.verdicts:
                    self.verdicts[form] = self._probe(form)
                verdict = self.verdicts[form]
                if verdict == "enforced" or (not require_enforced and not verdict.startswith("refused")):
                    self._resolved[order] = form
                    self._log_choice(order, form)
                    return form
            tried = "; ".join(f"{f}: {self.verdicts[f]}" for f in order)
            if require_enforced:
                raise LLMServerError(f"LLM server {self.url}: enforces none of the output constraint forms LANE "
                                     f"sends ({tried}); set llm.constraint_format=none to run without constraints "
                                     "(replies are then parsed, repaired and re-sampled)")
            raise LLMServerError(f"LLM server {self.url}: refuses both JSON-schema response formats ({tried}); "
                                 "set llm.constraint_format to auto, grammar or regex")

    def _log_choice(self, order: tuple[str, ...], form: str) -> None:
        from lane_ray.progress import log

        skipped = [f"{f} {self.verdicts[f]}" for f in order[: order.index(form)]]
        how = {"json_schema": "response_format json_schema", "json_object": "response_format json_object + schema",
               "grammar": "GBNF grammar field", "regex": "structured_outputs regex"}[form]
        checked = " (probe reply checked)" if self.verdicts.get(form) == "enforced" else " (not checked: "\
            + self.verdicts.get(form, "") + ")"
        log(f"openai backend {api_root(self.base_url)}: constraint format {form} ({how}){checked}"
            + (f"; skipped {'; '.join(skipped)}" if skipped else ""))

    def _probe(self, form: str) -> str:
        """Send :data:`PROBE` in ``form``: ``enforced`` when the reply follows it, ``ignored: ...`` when it does not,
        ``refused: ...`` when the server refuses the request (HTTP 400/422, or any error naming the form's field).
        Other failures (a server down, a wrong model name or key) raise :class:`LLMServerError`."""
        params = GenerationParams(max_new_tokens=PROBE.max_chars() + 8, temperature=0.0, top_p=1.0, seed=0)
        body = chat_request_body(self.model, PROBE_MESSAGES, params, PROBE_PREFILL, PROBE, form)
        try:
            try:
                resp = self._request(self.url, body, retries=0)
            except _StatusError as e:
                if self._refuses(e, form, probe=True):
                    return f"refused (HTTP {e.status}: {e.excerpt})"
                if e.status not in RETRIED_STATUS:
                    raise
                resp = self._request(self.url, body)
            except LLMServerError:
                resp = self._request(self.url, body)  # a transient failure: again, with the client's retries
        except _StatusError as e:
            if self._refuses(e, form, probe=True):
                return f"refused (HTTP {e.status}: {e.excerpt})"
            raise
        gen = parse_chat_response(resp, self.url)
        text, _ = normalize_reply(gen.text, PROBE_PREFILL, form)
        if PROBE.matches(text):
            return "enforced"
        return f"ignored (the probe reply did not follow it: {_excerpt(gen.text)!r})"

    @staticmethod
    def _refuses(e: _StatusError, form: str, probe: bool = False) -> bool:
        if probe and e.status in (400, 422):
            return True
        return e.status in (400, 422, 500, 501) and any(f in e.excerpt for f in FORM_FIELDS.get(form, ()))

    # -- generation ------------------------------------------------------------------------------------------

    def generate(self, conversations: list[Messages], params: GenerationParams, prefill: str = "",
                 constraint: Constraint = None) -> list[Generation]:
        if not conversations:
            return []
        rows = per_row(constraint, len(conversations))
        forms: dict[int, str] = {}
        jobs = []
        for c, t in zip(conversations, rows, strict=True):
            key = id(t)
            if key not in forms:
                forms[key] = self.form_for(t, prefill)
            form = forms[key]
            jobs.append((chat_request_body(self.model, c, params, prefill, t, form), form))
        if len(jobs) == 1:
            return [self._complete(*jobs[0], prefill)]
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)),
                                  thread_name_prefix="lane-openai")
        try:
            futures = [pool.submit(self._complete, body, form, prefill) for body, form in jobs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:  # the first failure in input order, not in completion order
                if f in done and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _complete(self, body: dict[str, Any], form: str, prefill: str) -> Generation:
        gen = parse_chat_response(self._request(self.url, body), self.url)
        gen.text, _ = normalize_reply(gen.text, prefill, form)
        gen.extra["constraint_format"] = form
        return gen

    def _request(self, url: str, body: dict[str, Any], retries: int | None = None) -> Any:
        """POST ``body`` to ``url`` (the chat-completions or completions URL) through the openai client, with its
        retries (``retries`` overrides ``max_retries``); the decoded JSON response, or :class:`LLMServerError`."""
        import openai

        client = self._client if retries is None else self._client.with_options(max_retries=retries)
        attempts = (self.max_retries if retries is None else retries) + 1
        typed = {k: body[k] for k in _TYPED_FIELDS if k in body}
        extra = {k: v for k, v in body.items() if k not in _TYPED_FIELDS and k not in ("model", "messages", "prompt")}
        headers = None if self._api_key else {"Authorization": openai.Omit()}
        after = f" (after {attempts} attempts)" if attempts > 1 else ""
        try:
            if url == self.completions_url:
                raw = client.completions.with_raw_response.create(
                    model=body["model"], prompt=body["prompt"], extra_body=extra or None, extra_headers=headers,
                    **typed)
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model=body["model"], messages=body["messages"], extra_body=extra or None, extra_headers=headers,
                    **typed)
        except openai.APIStatusError as e:
            excerpt = _error_body_excerpt(e.response.content if e.response is not None else b"")
            retried = after if e.status_code in RETRIED_STATUS else ""
            raise _StatusError(f"LLM server {url}: HTTP {e.status_code}: {excerpt}{retried}", e.status_code,
                               excerpt) from None
        except openai.APITimeoutError:
            raise LLMServerError(f"LLM server {url}: no response within {self.timeout_s:g} s (llm.timeout_s)"
                                 f"{after}") from None
        except openai.APIConnectionError as e:
            raise LLMServerError(f"LLM server {url}: {_connection_problem(e)}{after}") from None
        except openai.OpenAIError as e:
            raise LLMServerError(f"LLM server {url}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        content = raw.http_response.content
        try:
            return json.loads(content)
        except (ValueError, UnicodeDecodeError):
            raise LLMServerError(f"LLM server {url}: malformed response (not JSON): "
                                 f"{_excerpt(content) or '(empty body)'}") from None

    # -- scoring ---------------------------------------------------------------------------------------------

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
                resp = self._request(self.completions_url, body)
            except _StatusError as e:
                if e.status in (400, 404, 405, 422, 501):
                    raise LLMServerError(f"{e} (the server {NO_PROMPT_LOGPROBS})") from None
                raise
            return parse_score_response(resp, lo, hi, self.completions_url)

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)),
                                thread_name_prefix="lane-openai-score") as pool:
            for (i, *_), value in zip(jobs, pool.map(one, jobs), strict=True):
                out[i] = value
        return out


# --- batch work through ray.data.llm ------------------------------------------------------------------------


def build_openai_http_processor(model: str, base_url: str | None, params: GenerationParams, prefill: str = "",
                                constraint: Template | None = None, *, constraint_format: str = "auto",
                                api_key_env: str = "OPENAI_API_KEY", messages_column: str = "messages",
                                batch_size: int = 4, concurrency: int | tuple[int, int] = 1,
                                max_retries: int = 3, timeout_s: float = 120.0, qps: int | None = None,
                                num_cpus: float | None = None) -> Any:
    """A ``ray.data.llm`` processor sending :func:`chat_request_body` for each row's ``messages_column``
    (a list of ``{"role", "content"}``) to the server, in the wire form :meth:`OpenAIBackend.form_for` picks
    for ``constraint`` (probing the server here, on the driver, where ``constraint_format`` needs it). Output rows
    keep the input columns and add ``generated_text`` (the text after the prefill, as :class:`Generation.text`),
    ``new_tokens`` and ``finish_reason``; an error response raises :class:`LLMServerError` in the postprocess.
    See the module docstring for what the processor cannot do. ``num_cpus`` per HTTP actor (e.g. 0.25): the
    actors only wait on sockets."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    probe = OpenAIBackend(model, base_url, api_key_env=api_key_env, timeout_s=timeout_s,
                          constraint_format=constraint_format, max_retries=max_retries)
    form = probe.form_for(constraint, prefill)
    url = probe.url
    chat_request_body(model, [], params, prefill, constraint, form)  # validate before Ray runs
    stage: dict[str, Any] = {"num_cpus": num_cpus} if num_cpus is not None else {}
    config = HttpRequestProcessorConfig(
        url=url, headers=api_key_headers(api_key_env), batch_size=batch_size, concurrency=concurrency,
        qps=qps, max_retries=max_retries, base_retry_wait_time_in_s=0.5,
        session_factory=partial(_aiohttp_session, timeout_s), http_request_stage=stage or True,
    )
    # the body without its messages, as JSON text: the schema's nested objects differ in shape, which an Arrow
    # struct column would null-fill
    template_body = json.dumps(chat_request_body(model, [], params, prefill, constraint, form), ensure_ascii=False)
    return build_processor(
        config,
        preprocess=partial(_http_preprocess, template_body, messages_column),
        postprocess=partial(_http_postprocess, url, prefill, form),
    )


def _aiohttp_session(timeout_s: float) -> Any:
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))


def _http_preprocess(template_body: str, messages_column: str, row: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(template_body)
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row[messages_column]]
    body["messages"] = messages + body["messages"]  # the body's own messages: the continued prefill (regex)
    return {"payload": body}


def _http_postprocess(url: str, prefill: str, form: str, row: dict[str, Any]) -> dict[str, Any]:
    gen = parse_chat_response(_plain(row["http_response"]), url)
    text, _ = normalize_reply(gen.text, prefill, form)
    out = {k: v for k, v in row.items() if k not in ("payload", "http_response")}
    out.update(generated_text=text, new_tokens=gen.new_tokens, finish_reason=gen.finish_reason)
    return out


def _plain(obj: Any) -> Any:
    """Arrow/numpy containers back to dicts and lists."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ndarray":
        return [_plain(v) for v in obj]
    return obj


__all__ = ["AUTO_ORDER", "CONSTRAINT_FORMATS", "LLMServerError", "NO_PROMPT_LOGPROBS", "OpenAIBackend", "PROBE",
           "PROBE_PREFILL", "WIRE_FORMS", "api_key", "api_key_headers", "api_root", "build_openai_http_processor",
           "chat_completions_url", "chat_request_body", "completions_url", "normalize_reply", "parse_chat_response",
           "parse_score_response", "prefill_in_messages", "render_chatml", "resolve_base_url", "score_request_body"]
