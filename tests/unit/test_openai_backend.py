"""The ``openai`` backend without a model: request bodies in every constraint form, the prefill contract, the
auto probe, and the error contract of the openai client against a tiny scripted HTTP server on 127.0.0.1 (real
sockets): refused connections, timeouts, 4xx/5xx, Retry-After, dropped connections, malformed bodies."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lane_ray.errors import ConfigError, LaneError
from lane_ray.llm import backend_kwargs, make_backend, model_identity
from lane_ray.llm.backend import Choice, FreeText, GenerationParams, Template, Text, UnsupportedTemplate
from lane_ray.llm.openai_backend import (
    PROBE,
    PROBE_PREFILL,
    LLMServerError,
    OpenAIBackend,
    chat_completions_url,
    chat_request_body,
    normalize_reply,
)

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
PARAMS = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=0.9, seed=7)
PREFILL = '{"p": ["'
# a JSON-shaped template after PREFILL: two strings, the first opening with a choice
SLOTS = Template((Choice(("Drama", "Crime")), Text(" movies with"), FreeText(1, 3, "abcdefghijklmnopqrstuvwxyz "),
                  Text('", "'), FreeText(1, 2), Text('"]}')))
# not JSON-shaped whatever the prefill
PLAIN = Template((Choice(("yes", "no")), Text(" because "), FreeText(1, 3), Text('"')))


def completion(text: str, tokens: int = 3, finish: str = "stop") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    """No key or base URL from the environment unless a test sets one."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MY_LLM_KEY"):
        monkeypatch.delenv(name, raising=False)


# --- request bodies ----------------------------------------------------------------------------------------


def test_plain_body_carries_sampling_and_no_extensions():
    body = chat_request_body("m", CONV, GenerationParams(max_new_tokens=12, temperature=0.0, top_p=0.9, seed=7,
                                                         stop=("\n\n",)))
    assert body == {"model": "m", "messages": CONV, "n": 1, "max_tokens": 12, "temperature": 0.0, "top_p": 0.9,
                    "seed": 7, "stop": ["\n\n"]}
    assert "stop" not in chat_request_body("m", CONV, PARAMS)


def test_each_form_carries_its_constraint_and_handles_the_prefill():
    schema_body = chat_request_body("m", CONV, PARAMS, PREFILL, SLOTS, "json_schema")
    assert schema_body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "lane_reply", "schema": SLOTS.to_json_schema(PREFILL), "strict": True}}
    assert chat_request_body("m", CONV, PARAMS, PREFILL, SLOTS, "json_object")["response_format"] == {
        "type": "json_object", "schema": SLOTS.to_json_schema(PREFILL)}
    assert chat_request_body("m", CONV, PARAMS, PREFILL, SLOTS, "grammar")["grammar"] == SLOTS.to_gbnf(PREFILL)
    for form in ("json_schema", "json_object", "grammar", "none"):
        # the server cannot continue a prefilled turn: no assistant message; the constraint covers the prefill
        # and max_tokens makes room for it (and, for a schema, for a free layout)
        body = chat_request_body("m", CONV, PARAMS, PREFILL, SLOTS, form)
        assert body["messages"] == CONV and "continue_final_message" not in body
        assert body["max_tokens"] == 12 + len(PREFILL) + (16 if form.startswith("json") else 0)
        assert {"response_format", "grammar", "structured_outputs"} & set(body) == (
            set() if form == "none" else {"grammar" if form == "grammar" else "response_format"})
    # vLLM continues the prefill: the regex covers the template only
    body = chat_request_body("m", CONV, PARAMS, PREFILL, SLOTS, "regex")
    assert body["messages"][:2] == CONV and len(CONV) == 2  # the caller's list is not touched
    assert body["messages"][-1] == {"role": "assistant", "content": PREFILL}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["structured_outputs"] == {"regex": SLOTS.to_regex()} and body["max_tokens"] == 12
    assert re.fullmatch(body["structured_outputs"]["regex"], 'Crime movies with a twist", "x"]}')


def test_unknown_form_and_inexpressible_template():
    with pytest.raises(ConfigError, match="constraint form 'guided_regex'"):
        chat_request_body("m", CONV, PARAMS, constraint=SLOTS, form="guided_regex")
    with pytest.raises(ConfigError, match="llm.constraint_format"):
        OpenAIBackend("m", "http://127.0.0.1:1/v1", constraint_format="lane_template")
    with pytest.raises(UnsupportedTemplate, match="free text outside a JSON string"):
        chat_request_body("m", CONV, PARAMS, "", PLAIN, "json_schema")
    assert "grammar" in chat_request_body("m", CONV, PARAMS, "", PLAIN, "grammar")


def test_replies_lose_the_prefill_whatever_their_layout():
    assert normalize_reply('{"p": ["a b", "c"]}', PREFILL, "grammar") == ('a b", "c"]}', True)
    # llama.cpp's schema grammars leave spaces free: the JSON value is re-serialised in the templates' layout
    assert normalize_reply('{ "p" : [ "a b" ,"c" ] }\n', PREFILL, "json_object") == ('a b", "c"]}', True)
    assert normalize_reply('\n{"p": ["a", "\\u00e9t\\u00e9"]}', PREFILL, "none") == ('a", "été"]}', True)
    # truncated (finish_reason length): not JSON, but it starts with the prefill
    assert normalize_reply('{"p": ["a b", "c', PREFILL, "json_schema") == ('a b", "c', True)
    # no data is lost when the reply is something else: returned whole
    assert normalize_reply('Sure! {"likes": ["x"]}', PREFILL, "none") == ('Sure! {"likes": ["x"]}', False)
    assert normalize_reply('{"likes": ["x"]}', PREFILL, "none") == ('{"likes": ["x"]}', False)
    # vLLM continued the prefill: the text is already the continuation
    assert normalize_reply('a", "b"]}', PREFILL, "regex") == ('a", "b"]}', True)
    assert normalize_reply("anything", "", "json_schema") == ("anything", True)


def test_base_url_forms_env_fallbacks_and_model_id(monkeypatch):
    assert chat_completions_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/x/v1/chat/completions") == "https://h/x/v1/chat/completions"
    b = OpenAIBackend("smol", "http://127.0.0.1:8000/v1")
    assert b.model_id == "smol@http://127.0.0.1:8000/v1"
    from lane_ray.config import LLMConfig

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8123/v1")
    cfg = LLMConfig(backend="openai", model="smol")
    assert OpenAIBackend("smol").url == "http://127.0.0.1:8123/v1/chat/completions"
    assert model_identity(cfg) == make_backend("openai", **backend_kwargs(cfg)).model_id == \
        "smol@http://127.0.0.1:8123/v1"


@pytest.mark.parametrize("url", [None, "", "127.0.0.1:8000", "ftp://h/v1"])
def test_missing_or_bad_base_url_is_a_one_line_config_error(url):
    with pytest.raises(ConfigError, match="llm.base_url") as e:
        OpenAIBackend("m", url)
    assert isinstance(e.value, LaneError) and "\n" not in str(e.value)


def test_make_backend_builds_it_from_the_config():
    from lane_ray.config import LLMConfig

    cfg = LLMConfig(backend="openai", model="smol", base_url="http://127.0.0.1:9/v1", max_concurrency=3)
    assert cfg.constraint_format == "auto"
    b = make_backend("openai", **backend_kwargs(cfg))
    assert isinstance(b, OpenAIBackend) and b.max_concurrency == 3 and b.model_id == "smol@http://127.0.0.1:9/v1"
    assert b.constraint_format == "auto" and b.max_retries == 3
    with pytest.raises(ValueError, match="constraint_format"):
        LLMConfig(backend="openai", constraint_format="both")


# --- a scripted server on 127.0.0.1 ------------------------------------------------------------------------


@dataclass
class Script:
    """How the test server answers: ``respond(n, body, headers) -> (status, bytes, headers, delay_s)``;
    status None closes the connection without answering. ``requests`` keeps (body, headers with lower-case
    names)."""

    respond: Callable[[int, dict, dict], tuple[int | None, bytes, dict, float]]
    requests: list[tuple[dict, dict]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable], tuple[str, Script]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(respond: Callable) -> tuple[str, Script]:
        script = Script(respond)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                with script.lock:
                    n = len(script.requests)
                    script.requests.append((body, {k.lower(): v for k, v in self.headers.items()}))
                    script.in_flight += 1
                    script.max_in_flight = max(script.max_in_flight, script.in_flight)
                try:
                    status, payload, headers, delay = respond(n, body, dict(self.headers))
                    time.sleep(delay)
                    if status is None:  # drop the connection without a response
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass
                finally:
                    with script.lock:
                        script.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1", script

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def ok(text: str, delay: float = 0.0) -> tuple[int, bytes, dict, float]:
    return 200, json.dumps(completion(text)).encode(), {}, delay


def backend(url: str, **kw: Any) -> OpenAIBackend:
    kw = {"timeout_s": 5.0, "max_retries": 2, "constraint_format": "grammar", **kw}
    return OpenAIBackend("m", url, **kw)


def test_results_in_input_order_with_bounded_concurrency(scripted):
    def respond(n, body, headers):  # the later a conversation, the sooner its answer
        k = int(body["messages"][-1]["content"])
        return ok(f"answer {k}", delay=0.02 * (10 - k))

    url, script = scripted(respond)
    convs = [[{"role": "user", "content": str(k)}] for k in range(10)]
    gens = backend(url, max_concurrency=3).generate(convs, PARAMS)
    assert [g.text for g in gens] == [f"answer {k}" for k in range(10)]
    assert all(g.new_tokens == 3 and g.finish_reason == "stop" for g in gens)
    assert all(g.extra == {"prompt_tokens": 5, "constraint_format": "none"} for g in gens)
    assert 2 <= script.max_in_flight <= 3
    sent, headers = script.requests[0]
    assert sent == chat_request_body("m", convs[int(sent["messages"][0]["content"])], PARAMS)
    assert "authorization" not in headers  # no key: no header at all


def test_grammar_form_strips_the_prefill_and_sends_the_bearer_key(scripted, monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sekret")
    url, script = scripted(lambda n, body, headers: ok('{"p": ["Crime movies with a twist", "x"]}'))
    [g] = backend(url, api_key_env="MY_LLM_KEY").generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    assert g.text == 'Crime movies with a twist", "x"]}' and g.extra["constraint_format"] == "grammar"
    body, headers = script.requests[0]
    assert headers["authorization"] == "Bearer sekret"
    assert body["messages"] == CONV and body["grammar"] == SLOTS.to_gbnf(PREFILL)
    # the key variable unset: OPENAI_API_KEY
    monkeypatch.delenv("MY_LLM_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "fallback")
    backend(url, api_key_env="MY_LLM_KEY").generate([CONV], PARAMS)
    assert script.requests[1][1]["authorization"] == "Bearer fallback"


# --- constraint_format=auto and json_schema: the probe --------------------------------------------------------


def probe_reply(body: dict, layout: str = "") -> str:
    """What a server that enforces the probe's template writes (``layout``: a space where llama.cpp's schema
    grammars allow one)."""
    return "{" + layout + '"lane_probe"' + layout + ":" + layout + '"qzxx"' + layout + "}"


def llama_cpp_python_like(reply: Callable[[dict], str]) -> Callable:
    """A server like llama-cpp-python's: refuses response_format json_schema with an HTTP 500 naming the field,
    enforces json_object + schema and grammar, ignores unknown fields (structured_outputs)."""
    def respond(n, body, headers):
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            msg = "1 validation error: {'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be " \
                  "'text' or 'json_object'\"}"
            return 500, json.dumps({"error": {"message": msg, "type": "internal_server_error"}}).encode(), {}, 0.0
        if rf.get("type") == "json_object" or "grammar" in body:
            return ok(reply(body))
        return ok("Hello! How can I help you today?")
    return respond


def test_auto_takes_json_object_from_a_server_that_refuses_json_schema(scripted, capsys):
    def reply(body):
        is_probe = body["messages"] == [{"role": "user", "content": "Say hello."}]
        return probe_reply(body, " ") if is_probe else '{ "p" : [ "Drama movies with ab" , "q" ] }'

    url, script = scripted(llama_cpp_python_like(reply))
    b = backend(url, constraint_format="auto", max_retries=0)
    gens = b.generate([CONV, CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    assert [g.text for g in gens] == ['Drama movies with ab", "q"]}'] * 2  # re-laid out, prefill stripped
    assert all(g.extra["constraint_format"] == "json_object" for g in gens)
    assert b.verdicts["json_object"] == "enforced" and b.verdicts["json_schema"].startswith("refused (HTTP 500")
    sent = [body for body, _ in script.requests]
    assert [(s.get("response_format") or {}).get("type") for s in sent] == \
        ["json_schema", "json_object", "json_object", "json_object"]  # two probes, then the two rows
    assert sent[2]["response_format"]["schema"] == SLOTS.to_json_schema(PREFILL)
    log = capsys.readouterr().err
    assert log.count("\n") == 1 and "constraint format json_object" in log and "skipped json_schema refused" in log
    # remembered: the next call sends no probe
    b.generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    assert len(script.requests) == 5
    # a template that is not JSON-shaped goes out as a grammar (probed once)
    [g] = b.generate([CONV], PARAMS, prefill="", constraint=PLAIN)
    assert g.extra["constraint_format"] == "grammar" and script.requests[-1][0]["grammar"] == PLAIN.to_gbnf("")
    assert b.verdicts["grammar"] == "enforced"


def test_explicit_json_schema_falls_back_to_json_object_once(scripted):
    url, script = scripted(llama_cpp_python_like(lambda body: probe_reply(body)))
    b = backend(url, constraint_format="json_schema", max_retries=0)
    b.generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    b.generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    types = [body["response_format"]["type"] for body, _ in script.requests]
    assert types == ["json_schema", "json_object", "json_object", "json_object"]  # two probes, two rows
    assert b.verdicts == {"json_schema": b.verdicts["json_schema"], "json_object": "enforced"}
    with pytest.raises(ConfigError, match="json_schema cannot express"):
        b.generate([CONV], PARAMS, constraint=PLAIN)


def test_auto_never_falls_back_to_unconstrained_replies(scripted):
    # a server that ignores every field it does not know (and takes response_format but does not enforce it)
    url, script = scripted(lambda n, body, headers: ok("Hello! How can I help you today?"))
    b = backend(url, constraint_format="auto", max_retries=0)
    with pytest.raises(LLMServerError) as e:
        b.generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    msg = str(e.value)
    assert "enforces none of the output constraint forms" in msg and "llm.constraint_format=none" in msg
    assert "json_schema: ignored" in msg and "regex: ignored" in msg and "\n" not in msg
    assert len(script.requests) == 4  # one probe per form, no generation
    # none: the replies come back as they are (the parser and the retries cope)
    [g] = backend(url, constraint_format="none").generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    assert g.text == "Hello! How can I help you today?" and g.extra["constraint_format"] == "none"
    assert "response_format" not in script.requests[-1][0] and "grammar" not in script.requests[-1][0]


def test_auto_on_a_vllm_like_server_takes_json_schema(scripted):
    def respond(n, body, headers):
        if (body.get("response_format") or {}).get("type") == "json_schema":
            return ok(probe_reply(body) if "lane_probe" in json.dumps(body["response_format"])
                      else '{"p": ["Crime movies with a b", "c"]}')
        return ok("Hello")

    url, script = scripted(respond)
    b = backend(url, constraint_format="auto")
    [g] = b.generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    assert g.text == 'Crime movies with a b", "c"]}' and list(b.verdicts) == ["json_schema"]


def test_a_probe_failing_for_another_reason_is_that_error(scripted):
    url, _ = scripted(lambda n, body, headers: (404, b'{"error": {"message": "model m not found"}}', {}, 0.0))
    with pytest.raises(LLMServerError, match="HTTP 404: model m not found"):
        backend(url, constraint_format="auto").generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)


# --- the error contract ------------------------------------------------------------------------------------


def assert_one_line(err: BaseException, url: str, *parts: str) -> None:
    msg = str(err)
    assert isinstance(err, LLMServerError) and isinstance(err, LaneError)
    assert "\n" not in msg and f"{url}/chat/completions" in msg, msg
    for p in parts:
        assert p in msg, msg


def test_http_500_is_retried_then_reported_with_status_and_excerpt(scripted):
    url, script = scripted(lambda n, body, headers: (500, b"Internal kaboom\n\n  in the engine", {}, 0.0))
    with pytest.raises(LLMServerError) as e:
        backend(url, max_retries=1).generate([CONV], PARAMS)
    assert_one_line(e.value, url, "HTTP 500", "Internal kaboom in the engine", "after 2 attempts")
    assert len(script.requests) == 2


def test_503_and_429_recover_after_retries_honouring_retry_after(scripted):
    def respond(n, body, headers):
        if n == 0:
            return 503, b'{"error": {"message": "warming up"}}', {"Retry-After": "0.05"}, 0.0
        if n == 1:
            return 429, b"slow down", {"Retry-After": "0.05"}, 0.0
        return ok("fine")

    url, script = scripted(respond)
    t0 = time.monotonic()
    assert [g.text for g in backend(url).generate([CONV], PARAMS)] == ["fine"]
    assert len(script.requests) == 3 and time.monotonic() - t0 < 2  # the server's 50 ms, not the default backoff


def test_4xx_is_not_retried_and_names_the_problem(scripted):
    err = {"error": {"message": "field 'temperature': must be a number in [0, 2]", "type": "BadRequestError"}}
    url, script = scripted(lambda n, body, headers: (400, json.dumps(err).encode(), {}, 0.0))
    with pytest.raises(LLMServerError) as e:
        backend(url).generate([CONV], PARAMS)
    assert_one_line(e.value, url, "HTTP 400", "field 'temperature'")
    assert "attempts" not in str(e.value) and len(script.requests) == 1


@pytest.mark.parametrize("payload,problem", [
    (b"<html>502 proxy says hello</html>", "malformed response (not JSON): <html>502 proxy says hello</html>"),
    (b'{"object": "list", "data": []}', "malformed response (no choices[0].message.content"),
    (b'{"choices": [{"message": {"content": null}}]}', "malformed response"),
    (b"", "malformed response (not JSON): (empty body)"),
])
def test_malformed_bodies(scripted, payload, problem):
    url, script = scripted(lambda n, body, headers: (200, payload, {"Content-Type": "text/html"}, 0.0))
    with pytest.raises(LLMServerError) as e:
        backend(url).generate([CONV], PARAMS)
    assert_one_line(e.value, url, problem)
    assert len(script.requests) == 1


def test_connection_refused_names_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(LLMServerError) as e:
        backend(url, max_retries=0).generate([CONV, CONV, CONV], PARAMS)
    assert_one_line(e.value, url, "connection refused", "llm.base_url")


def test_timeout_names_the_limit(scripted):
    url, script = scripted(lambda n, body, headers: ok("late", delay=1.5))
    t0 = time.monotonic()
    with pytest.raises(LLMServerError) as e:
        backend(url, timeout_s=0.3, max_retries=0).generate([CONV], PARAMS)
    assert_one_line(e.value, url, "no response within 0.3 s", "llm.timeout_s")
    assert time.monotonic() - t0 < 1.4 and len(script.requests) == 1


def test_dropped_connections_are_retried(scripted):
    url, script = scripted(lambda n, body, headers: (None, b"", {}, 0.0) if n < 2 else ok("back"))
    assert backend(url).generate([CONV], PARAMS)[0].text == "back"
    url, script = scripted(lambda n, body, headers: (None, b"", {}, 0.0))
    with pytest.raises(LLMServerError) as e:
        backend(url, max_retries=1).generate([CONV], PARAMS)
    assert_one_line(e.value, url, "connection dropped", "after 2 attempts")
    assert len(script.requests) == 2


def test_the_probe_goes_through_a_server_warming_up(scripted):
    def respond(n, body, headers):
        if n == 0:
            return 503, b'{"error": {"message": "loading model"}}', {"Retry-After": "0.05"}, 0.0
        return ok(probe_reply(body)) if "grammar" in body else ok("Hello")

    url, script = scripted(respond)
    b = backend(url, constraint_format="auto")
    b.generate([CONV], PARAMS, prefill=PREFILL, constraint=SLOTS)
    assert b.verdicts["grammar"] == "enforced"


# ----------------------------------------------------------------------------------------------- scoring


def echoed(text: str, pieces: list[str], logprobs: list[float | None]) -> dict[str, Any]:
    """A completions response echoing ``text`` split into ``pieces`` (legacy logprobs format)."""
    assert "".join(pieces) == text
    offsets = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces))]
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "logprobs": {
        "tokens": pieces, "token_logprobs": logprobs, "text_offset": offsets, "top_logprobs": None}}]}


def test_score_body_chatml_and_response_parsing():
    from lane_ray.llm.openai_backend import (
        completions_url,
        parse_score_response,
        render_chatml,
        score_request_body,
    )

    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/completions"
    prompt = render_chatml(CONV, "[")
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n["
    body = score_request_body("m", "P:", " yes")
    assert body == {"model": "m", "prompt": "P: yes", "max_tokens": 1, "temperature": 0.0, "echo": True,
                    "logprobs": 1}
    # tokens ending after the prompt and starting before its end count, a token straddling the boundary too
    resp = echoed("P: yes", ["P", ":", " y", "es"], [None, -1.0, -0.5, -0.25])
    assert parse_score_response(resp, 2, 6, "u") == -0.75
    assert parse_score_response(echoed("P: yes", ["P", ": y", "es"], [None, -1.0, -0.25]), 3, 6, "u") == -1.25
    # a generated token after the echo is not part of the score
    resp["choices"][0]["logprobs"]["tokens"].append("!")
    resp["choices"][0]["logprobs"]["token_logprobs"].append(-9.0)
    resp["choices"][0]["logprobs"]["text_offset"].append(6)
    assert parse_score_response(resp, 2, 6, "u") == -0.75
    # llama-cpp-python: offsets count the prompt without its special tokens (<|im_end|> an empty token, the
    # BOS <|im_start|> left out); the generated token is known from usage
    sent = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" + " yes"
    pieces = ["user", "\n", "hi", "", "\n", "ass", "istant", "\n", " y", "es", "!"]
    offsets = [0, 4, 5, 7, 7, 8, 11, 17, 18, 20, 22]
    lps = [None, -0.1, -3.0, -0.2, -0.01, -0.02, -0.01, -0.01, -0.5, -0.25, -2.0]
    resp = {"choices": [{"logprobs": {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 1}}
    assert parse_score_response(resp, len(sent) - 4, len(sent), "u") == -0.75
    for bad in ({"choices": [{"text": "x", "logprobs": None}]}, {"choices": [{"text": "x"}]},
                echoed("P", ["P"], [None])):  # the last: the prompt was not echoed
        with pytest.raises(LLMServerError, match="does not return prompt logprobs"):
            parse_score_response(bad, 2, 6, "u")


def test_score_against_a_server_with_and_without_logprobs(scripted):
    from lane_ray.llm.openai_backend import render_chatml

    def respond(n, body, headers):
        text = body["prompt"]
        cut = len(text) - len(" yes")
        return 200, json.dumps(echoed(text, [text[:cut], " y", "es"], [None, -0.5, -0.25])).encode(), {}, 0.0

    url, script = scripted(respond)
    b = backend(url)
    assert b.score([CONV, CONV, CONV], [" yes", "", " yes"], prefill="[") == [-0.75, 0.0, -0.75]
    assert len(script.requests) == 2  # the empty continuation scored 0.0 without a request
    body = script.requests[0][0]
    assert body["prompt"] == render_chatml(CONV, "[") + " yes" and body["echo"] is True and body["logprobs"] == 1
    # a chat-only server: the error says what score() needs
    url2, _ = scripted(lambda n, body, headers: (404, b'{"detail": "Not Found"}', {}, 0.0))
    with pytest.raises(LLMServerError, match=r"HTTP 404.*does not return prompt logprobs") as e:
        backend(url2).score([CONV], [" yes"])
    assert "/v1/completions" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="1 conversations for 2 continuations"):
        b.score([CONV], ["a", "b"])


def test_probe_template_is_what_the_forms_carry():
    # the probe needs what real templates need: a choice and a bounded class inside a JSON string
    assert PROBE.matches("qzx\"}") and not PROBE.matches("hello\"}")
    assert PROBE.to_json_schema(PROBE_PREFILL)["properties"]["lane_probe"]["pattern"] == "^(qz)[x]{1,16}$"
