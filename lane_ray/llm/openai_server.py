"""A small, real OpenAI-compatible chat server over any :class:`~lane_ray.llm.backend.LLMBackend` (default:
the ``transformers`` backend with the packaged SmolLM2), for tests, laptops and single-machine runs. For GPUs
and real traffic use ``vllm serve`` or the Ray Serve LLM app: the ``openai`` backend talks to all three.

Launch (binds 127.0.0.1 unless told otherwise)::

    python -m lane_ray.llm.openai_server --model smollm2-135m-instruct --host 127.0.0.1 --port 8000
    # then: lane ... --set llm.backend=openai --set llm.base_url=http://127.0.0.1:8000/v1

Endpoints: ``GET /v1/models``, ``GET /health`` (with the number of generate calls so far) and
``POST /v1/chat/completions`` with ``messages``, ``max_tokens`` (or ``max_completion_tokens``),
``temperature``, ``top_p``, ``seed``, ``stop``, ``n`` (1 only), vLLM's ``continue_final_message`` prefill
(the last message, role ``assistant``, is continued; the response holds only the continuation) and
``lane_template`` (a :class:`~lane_ray.llm.backend.Template` as JSON, see
:func:`~lane_ray.llm.openai_backend.template_to_json`). vLLM's ``structured_outputs`` / ``guided_regex`` are
ignored when ``lane_template`` is present and refused (400) without it: a regex cannot be enforced here.
Unknown fields are ignored, as vLLM does. Bad requests get a 400 (404 for an unknown model) whose message
names the field; no streaming.

``POST /v1/completions`` scores prompts only (what :meth:`OpenAIBackend.score` sends): ``prompt`` (a string),
``echo: true`` and ``logprobs`` (an integer >= 0) are required, ``max_tokens`` may be 0 or 1 and nothing is
generated; the response echoes the prompt with ``logprobs.tokens``, ``token_logprobs`` (the first is null) and
``text_offset`` in the legacy completions format, ``top_logprobs`` null. Other requests get a 400 naming the
field; a backend without ``prompt_logprobs`` (the ``transformers`` backend has it) gets a 501.

Batching: requests are queued; one worker takes everything queued (after waiting ``batch_wait_ms`` for
stragglers), groups it by (sampling parameters, prefill, template) and runs each group, up to
``max_batch_size`` conversations, as one ``backend.generate`` call on a single generation thread, so the
model never runs twice at once and requests that arrive while it runs form the next batch. Requests from one
``OpenAIBackend.generate`` call share their parameters and so batch together. ``seed`` therefore fixes a
batch, not a request independently of the requests batched with it.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves handler annotations from here
from fastapi.responses import JSONResponse

from lane_ray.errors import LaneError
from lane_ray.llm.backend import Generation, GenerationParams, LLMBackend, Messages, Template

DEFAULT_MAX_TOKENS = 256
MAX_STOP = 16


class RequestError(Exception):
    """A bad request: HTTP ``status`` and a message naming ``param``."""

    def __init__(self, param: str, message: str, status: int = 400) -> None:
        super().__init__(f"field '{param}': {message}")
        self.param = param
        self.status = status


@dataclass(frozen=True)
class ChatJob:
    """What one request asks the backend for (hashable: equal jobs batch together, messages aside)."""

    params: GenerationParams
    prefill: str
    constraint: Template | None


def _content(value: Any, k: int) -> str:
    """A message's content: a string or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise RequestError(f"messages[{k}].content", "must be a string or a list of text parts")


def _check_body(body: Any, served_model: str) -> None:
    """A request body must be a JSON object, and name the served model when it names one."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise RequestError("model", f"the model '{model}' does not exist (served: '{served_model}')", 404)


def parse_chat_request(body: Any, served_model: str, max_tokens_limit: int = 4096) -> tuple[Messages, ChatJob]:
    """Validate a chat-completions body; the conversation (without the prefill) and the job. Raises
    :class:`RequestError` naming the first bad field."""
    from lane_ray.llm.openai_backend import template_from_json

    _check_body(body, served_model)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages", "must be a non-empty list of {role, content}")
    messages: Messages = []
    for k, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{k}]", "must be an object with role and content")
        if m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{k}].role", "must be system, user or assistant")
        messages.append({"role": m["role"], "content": _content(m.get("content"), k)})

    def number(name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v > hi or (v <= lo if lo_open else v < lo):
            raise RequestError(name, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return float(v)

    def integer(name: str) -> int | None:
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise RequestError(name, "must be an integer")
        return v

    for name in ("max_completion_tokens", "max_tokens"):
        max_tokens = integer(name)
        if max_tokens is not None:
            if not 1 <= max_tokens <= max_tokens_limit:
                raise RequestError(name, f"must be between 1 and {max_tokens_limit}")
            break
    else:
        max_tokens = DEFAULT_MAX_TOKENS
    temperature = number("temperature", 1.0, 0.0, 2.0)
    top_p = number("top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = integer("seed")
    frequency_penalty = number("frequency_penalty", 0.0, -2.0, 2.0)
    n = integer("n")
    if n not in (None, 1):
        raise RequestError("n", "only n=1 is supported")
    if body.get("stream"):
        raise RequestError("stream", "streaming is not supported by this server")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")

    prefill = ""
    cont = body.get("continue_final_message", False)
    if not isinstance(cont, bool):
        raise RequestError("continue_final_message", "must be true or false")
    if cont:
        if body.get("add_generation_prompt", True) is not False:
            raise RequestError("add_generation_prompt", "must be false with continue_final_message "
                               "(the final message is continued, no new turn starts)")
        if messages[-1]["role"] != "assistant":
            raise RequestError("messages", "with continue_final_message the last message must be the assistant's")
        prefill = messages.pop()["content"]
        if not messages:
            raise RequestError("messages", "needs at least one message before the continued assistant message")

    constraint = None
    if body.get("lane_template") is not None:
        try:
            constraint = template_from_json(body["lane_template"])
        except ValueError as e:
            raise RequestError("lane_template", str(e)) from None
    else:
        for name in ("structured_outputs", "guided_regex", "guided_json", "guided_choice", "guided_grammar",
                     "response_format"):
            if body.get(name) not in (None, {}, {"type": "text"}):
                raise RequestError(name, "not supported by this server; send the constraint as 'lane_template'")
    params = GenerationParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              seed=seed if seed is not None else 0, stop=tuple(stop or ()),
                              frequency_penalty=frequency_penalty)
    return messages, ChatJob(params, prefill, constraint)


def parse_completion_request(body: Any, served_model: str, max_chars: int = 200_000) -> str:
    """Validate a scoring completions body (see the module docstring); the prompt text. Raises
    :class:`RequestError` naming the first bad field."""
    _check_body(body, served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt", "must be a non-empty string (one prompt per request)")
    if len(prompt) > max_chars:
        raise RequestError("prompt", f"longer than {max_chars} characters")
    if body.get("echo") is not True:
        raise RequestError("echo", "must be true: this server's /v1/completions scores prompts only "
                           "(use /v1/chat/completions to generate)")
    lp = body.get("logprobs")
    if isinstance(lp, bool) or not isinstance(lp, int) or lp < 0:
        raise RequestError("logprobs", "must be an integer >= 0 (the prompt's logprobs are what is returned)")
    mt = body.get("max_tokens", 0)
    if mt not in (0, 1) or isinstance(mt, bool):
        raise RequestError("max_tokens", "must be 0 or 1: this server's /v1/completions generates nothing")
    if body.get("stream"):
        raise RequestError("stream", "streaming is not supported by this server")
    return prompt


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` cut before the first stop string (OpenAI semantics: the stop string is not returned), and
    whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclass
class _Pending:
    messages: Messages
    job: ChatJob
    future: asyncio.Future


class Batcher:
    """Groups queued requests into ``backend.generate`` calls run on one thread (see the module docstring)."""

    def __init__(self, backend: LLMBackend, max_batch_size: int = 32, batch_wait_s: float = 0.005) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lane-generate")
        self.batches = 0  # generate calls so far (reported by GET /health)

    async def submit(self, messages: Messages, job: ChatJob) -> tuple[Generation, int]:
        """The generation for one conversation and its prompt token count (0 when the backend cannot count)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(messages, job, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            if self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            groups: dict[ChatJob, list[_Pending]] = {}
            for p in pending:
                if not p.future.cancelled():
                    groups.setdefault(p.job, []).append(p)
            for job, group in groups.items():
                for i in range(0, len(group), self.max_batch_size):
                    chunk = group[i: i + self.max_batch_size]
                    try:
                        results = await loop.run_in_executor(self.executor, self._generate, job,
                                                             [p.messages for p in chunk])
                    except Exception as e:  # the backend failed: every request of the chunk gets a 500
                        for p in chunk:
                            if not p.future.done():
                                p.future.set_exception(e)
                        continue
                    for p, r in zip(chunk, results, strict=True):
                        if not p.future.done():
                            p.future.set_result(r)

    def _generate(self, job: ChatJob, conversations: list[Messages]) -> list[tuple[Generation, int]]:
        self.batches += 1
        gens = self.backend.generate(conversations, job.params, prefill=job.prefill, constraint=job.constraint)
        if len(gens) != len(conversations):
            raise RuntimeError(f"backend returned {len(gens)} generations for {len(conversations)} conversations")
        count: Callable[[str], int] | None = getattr(self.backend, "count_tokens", None)
        render: Callable[..., str] | None = getattr(self.backend, "render", None)
        prompt_tokens = [0] * len(conversations)
        if count is not None and render is not None:
            try:
                prompt_tokens = [count(render(c, job.prefill)) for c in conversations]
            except Exception:  # usage is informative only; never fail a generation over it
                pass
        return list(zip(gens, prompt_tokens, strict=True))


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            501: "NotImplementedError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def build_app(backend: LLMBackend, served_model: str, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
              api_key: str | None = None, max_tokens_limit: int = 4096) -> FastAPI:
    """The FastAPI app serving ``backend`` under the name ``served_model``. With ``api_key``, requests must
    send ``Authorization: Bearer <api_key>``."""

    batcher = Batcher(backend, max_batch_size, batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="LANE OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.batcher = batcher
    created = int(time.time())

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())

    async def json_body(request: Request) -> tuple[Any, Any]:
        """(the JSON body, None) of an authorized request, or (None, the error response)."""
        if not authorized(request):
            return None, _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authorization")
        try:
            return await request.json(), None
        except ValueError:
            return None, _error(400, "field 'body': not valid JSON", "body")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "generate_calls": batcher.batches}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        if not authorized(request):
            return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authorization")
        return {"object": "list", "data": [{"id": served_model, "object": "model", "created": created,
                                            "owned_by": "lane-ray", "root": getattr(backend, "model_id", None)}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body, error = await json_body(request)
        if error is not None:
            return error
        try:
            messages, job = parse_chat_request(body, served_model, max_tokens_limit)
        except RequestError as e:
            return _error(e.status, str(e), e.param)
        try:
            gen, prompt_tokens = await batcher.submit(messages, job)
        except Exception as e:
            return _error(500, f"generation failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        text, stopped = apply_stop(gen.text, job.params.stop)
        finish = "stop" if stopped else gen.finish_reason
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served_model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": gen.new_tokens,
                      "total_tokens": prompt_tokens + gen.new_tokens},
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body, error = await json_body(request)
        if error is not None:
            return error
        try:
            prompt = parse_completion_request(body, served_model)
        except RequestError as e:
            return _error(e.status, str(e), e.param)
        fn: Callable[[str], Any] | None = getattr(backend, "prompt_logprobs", None)
        if fn is None:
            return _error(501, f"the {type(backend).__name__} backend cannot score prompts (no prompt_logprobs)")
        try:  # on the generation thread: the model never runs twice at once
            tokens, offsets, logprobs = await asyncio.get_running_loop().run_in_executor(batcher.executor, fn, prompt)
        except Exception as e:
            return _error(500, f"scoring failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served_model,
            "choices": [{"index": 0, "text": prompt, "finish_reason": "length",
                         "logprobs": {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
                                      "top_logprobs": None}}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)},
        }

    return app


def main(argv: list[str] | None = None) -> int:
    """``python -m lane_ray.llm.openai_server``: load the model, then serve until interrupted."""
    p = argparse.ArgumentParser(prog="python -m lane_ray.llm.openai_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="packaged name, HF model directory or .gguf file (transformers backend)")
    p.add_argument("--served-model-name", default=None, help="name clients send as 'model' (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-batch-size", type=int, default=32, help="conversations per generate call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait for more requests before a batch")
    p.add_argument("--api-key-env", default=None,
                   help="require 'Authorization: Bearer <key>' with the key from this environment variable")
    args = p.parse_args(argv)
    try:
        api_key = None
        if args.api_key_env:
            api_key = os.environ.get(args.api_key_env, "")
            if not api_key:
                raise LaneError(f"--api-key-env: environment variable {args.api_key_env} is empty or unset")
        from lane_ray.llm.transformers_backend import TransformersBackend

        backend = TransformersBackend(model=args.model, device=args.device, dtype=args.dtype,
                                      num_threads=args.threads, max_prompt_tokens=args.max_prompt_tokens)
    except LaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    name = args.served_model_name or args.model
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    app = build_app(backend, name, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    api_key=api_key)
    print(f"serving '{name}' at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
