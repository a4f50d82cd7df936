"""The ``openai`` backend without a model: request bodies, the Template on the wire, the server's request
validation, and error mapping against a tiny scripted HTTP server on 127.0.0.1 (real sockets)."""

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
from lane_ray.llm import backend_kwargs, make_backend
from lane_ray.llm.backend import Choice, FreeText, GenerationParams, Template, Text, json_string_array
from lane_ray.llm.openai_backend import (
    LLMServerError,
    OpenAIBackend,
    chat_completions_url,
    chat_request_body,
    template_from_json,
    template_to_json,
)
from lane_ray.llm.openai_server import RequestError, apply_stop, parse_chat_request

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
PARAMS = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=0.9, seed=7)


def completion(text: str, tokens: int = 3, finish: str = "stop") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}


# --- request bodies ----------------------------------------------------------------------------------------


def test_plain_body_carries_sampling_and_no_extensions():
    body = chat_request_body("m", CONV, GenerationParams(max_new_tokens=12, temperature=0.0, top_p=0.9, seed=7,
                                                         stop=("\n\n",)))
    assert body == {"model": "m", "messages": CONV, "n": 1, "max_tokens": 12, "temperature": 0.0, "top_p": 0.9,
                    "seed": 7, "stop": ["\n\n"]}
    assert "stop" not in chat_request_body("m", CONV, PARAMS)


def test_prefill_is_a_continued_assistant_message():
    body = chat_request_body("m", CONV, PARAMS, prefill='{"preferences": ["')
    assert body["messages"][:2] == CONV and len(CONV) == 2  # the caller's list is not touched
    assert body["messages"][-1] == {"role": "assistant", "content": '{"preferences": ["'}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


@pytest.mark.parametrize("mode,fields", [
    ("both", {"structured_outputs", "lane_template"}), ("structured_outputs", {"structured_outputs"}),
    ("guided_regex", {"guided_regex"}), ("lane_template", {"lane_template"}), ("none", set())])
def test_constraint_modes(mode, fields):
    t = json_string_array(3, max_tokens=5)
    body = chat_request_body("m", CONV, PARAMS, '{"p": ["', t, constraint_mode=mode)
    assert fields == {"structured_outputs", "guided_regex", "lane_template"} & set(body)
    regex = body.get("structured_outputs", {}).get("regex") or body.get("guided_regex")
    if regex:
        assert regex == t.to_regex()
        assert re.fullmatch(regex, 'sci-fi films", "old westerns", "quiet dramas"]}')
        assert not re.fullmatch(regex, 'sci-fi films", "old westerns"]}')
    if "lane_template" in body:
        assert template_from_json(json.loads(json.dumps(body["lane_template"]))) == t


def test_unknown_constraint_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="constraint_mode"):
        chat_request_body("m", CONV, PARAMS, constraint=json_string_array(1), constraint_mode="grammar")
    with pytest.raises(ConfigError, match="constraint_mode"):
        OpenAIBackend("m", "http://127.0.0.1:1/v1", constraint_mode="grammar")


def test_template_json_round_trip_and_errors():
    t = Template((Choice(("Drama", "Comedy")), Text(" "), FreeText(0, 4), Text('", "'), FreeText(2, 9),
                  Text('"]}')))
    wire = template_to_json(t)
    assert wire["segments"][0] == {"type": "choice", "options": ["Drama", "Comedy"]}
    assert template_from_json(wire) == t and template_from_json(json.dumps(wire)) == t
    # Arrow fills keys a segment does not use with nulls: they are ignored
    nulls = {"segments": [dict({"type": None, "text": None, "min_tokens": None, "max_tokens": None,
                                "options": None}, **s) for s in wire["segments"]]}
    assert template_from_json(nulls) == t
    for bad, where in [({"segments": [{"type": "text"}]}, "segment 0"),
                       ({"segments": [{"type": "text", "text": "a"}, {"type": "regex"}]}, "segment 1"),
                       ({"segments": [{"type": "free_text", "min_tokens": "2"}, {"type": "text", "text": '"'}]},
                        "segment 0"),
                       ({"segments": [{"type": "free_text"}]}, "FreeText must be followed"),
                       ([], "segments"), ("{not json", "not valid JSON")]:
        with pytest.raises(ValueError, match=where):
            template_from_json(bad)


def test_base_url_forms_and_model_id():
    assert chat_completions_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/x/v1/chat/completions") == "https://h/x/v1/chat/completions"
    b = OpenAIBackend("smol", "http://127.0.0.1:8000/v1")
    assert b.model_id == "smol@http://127.0.0.1:8000/v1"


@pytest.mark.parametrize("url", [None, "", "127.0.0.1:8000", "ftp://h/v1"])
def test_missing_or_bad_base_url_is_a_one_line_config_error(url):
    with pytest.raises(ConfigError, match="llm.base_url") as e:
        OpenAIBackend("m", url)
    assert isinstance(e.value, LaneError) and "\n" not in str(e.value)


def test_make_backend_builds_it_from_the_config():
    from lane_ray.config import LLMConfig

    cfg = LLMConfig(backend="openai", model="smol", base_url="http://127.0.0.1:9/v1", max_concurrency=3)
    b = make_backend("openai", **backend_kwargs(cfg))
    assert isinstance(b, OpenAIBackend) and b.max_concurrency == 3 and b.model_id == "smol@http://127.0.0.1:9/v1"


# --- the server's request validation (no model needed) -----------------------------------------------------


def test_server_parses_prefill_template_and_sampling():
    t = json_string_array(2, max_tokens=4)
    body = chat_request_body("smol", CONV, GenerationParams(max_new_tokens=9, temperature=0.5, top_p=0.8, seed=3,
                                                            stop=("END",)), '{"p": ["', t)
    messages, job = parse_chat_request(body, "smol")
    assert messages == CONV and job.prefill == '{"p": ["' and job.constraint == t
    assert job.params == GenerationParams(max_new_tokens=9, temperature=0.5, top_p=0.8, seed=3, stop=("END",))
    # equal jobs batch together
    assert parse_chat_request(body, "smol")[1] == job and hash(parse_chat_request(body, "smol")[1]) == hash(job)


@pytest.mark.parametrize("change,field_name,status", [
    ({"messages": []}, "messages", 400),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", 400),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", 400),
    ({"temperature": "hot"}, "temperature", 400),
    ({"temperature": 3}, "temperature", 400),
    ({"top_p": 0}, "top_p", 400),
    ({"max_tokens": 0}, "max_tokens", 400),
    ({"max_tokens": 1.5}, "max_tokens", 400),
    ({"seed": "x"}, "seed", 400),
    ({"n": 2}, "n", 400),
    ({"stream": True}, "stream", 400),
    ({"stop": [""]}, "stop", 400),
    ({"model": "gpt-4"}, "model", 404),
    ({"continue_final_message": True}, "add_generation_prompt", 400),
    ({"continue_final_message": True, "add_generation_prompt": False}, "messages", 400),
    ({"lane_template": {"segments": [{"type": "bogus"}]}}, "lane_template", 400),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs", 400),
])
def test_server_rejects_bad_fields_by_name(change, field_name, status):
    body = {"model": "smol", "messages": CONV, **change}
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, "smol")
    assert e.value.param == field_name and e.value.status == status and f"field '{field_name}'" in str(e.value)


def test_server_ignores_regex_when_a_template_is_sent():
    body = chat_request_body("smol", CONV, PARAMS, "", json_string_array(1))
    assert "structured_outputs" in body and parse_chat_request(body, "smol")[1].constraint == json_string_array(1)


def test_stop_strings_are_cut_like_openai():
    assert apply_stop("one. two END three", ("END", ".")) == ("one", True)
    assert apply_stop("no stop here", ("END",)) == ("no stop here", False)


# --- error mapping against a scripted server on 127.0.0.1 --------------------------------------------------


@dataclass
class Script:
    """How the test server answers: ``respond(n, body, headers) -> (status, bytes, headers, delay_s)``;
    status None closes the connection without answering."""

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
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                with script.lock:
                    n = len(script.requests)
                    script.requests.append((body, dict(self.headers)))
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
    kw = {"timeout_s": 5.0, "max_retries": 2, "retry_backoff_s": 0.01, **kw}
    return OpenAIBackend("m", url, **kw)


def test_results_in_input_order_with_bounded_concurrency(scripted, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    def respond(n, body, headers):  # the later a conversation, the sooner its answer
        k = int(body["messages"][-1]["content"])
        return ok(f"answer {k}", delay=0.02 * (10 - k))

    url, script = scripted(respond)
    convs = [[{"role": "user", "content": str(k)}] for k in range(10)]
    gens = backend(url, max_concurrency=3).generate(convs, PARAMS)
    assert [g.text for g in gens] == [f"answer {k}" for k in range(10)]
    assert all(g.new_tokens == 3 and g.finish_reason == "stop" and g.extra == {"prompt_tokens": 5} for g in gens)
    assert 2 <= script.max_in_flight <= 3
    sent, headers = script.requests[0]
    assert sent == chat_request_body("m", convs[int(sent["messages"][0]["content"])], PARAMS)
    assert "Authorization" not in headers


def test_prefill_continuation_and_bearer_key(scripted, monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sekret")
    url, script = scripted(lambda n, body, headers: ok('sci-fi", "noir"]}'))
    t = json_string_array(2)
    [g] = backend(url, api_key_env="MY_LLM_KEY").generate([CONV], PARAMS, prefill='{"p": ["', constraint=t)
    assert g.text == 'sci-fi", "noir"]}'
    body, headers = script.requests[0]
    assert headers["Authorization"] == "Bearer sekret"
    assert body["messages"][-1] == {"role": "assistant", "content": '{"p": ["'}
    assert body["structured_outputs"] == {"regex": t.to_regex()} and template_from_json(body["lane_template"]) == t


def assert_one_line(err: BaseException, url: str, *parts: str) -> None:
    msg = str(err)
    assert isinstance(err, LLMServerError) and isinstance(err, LaneError)
    assert "\n" not in msg and f"{url}/chat/completions" in msg, msg
    for p in parts:
        assert p in msg, msg


def test_http_500_is_retried_then_reported_with_status_and_excerpt(scripted):
    url, script = scripted(lambda n, body, headers: (500, b"Internal kaboom\n\n  in the engine", {}, 0.0))
    with pytest.raises(LLMServerError) as e:
        backend(url).generate([CONV, CONV], PARAMS)
    assert_one_line(e.value, url, "HTTP 500", "Internal kaboom in the engine", "after 3 attempts")
    assert len(script.requests) >= 3


def test_503_and_429_recover_after_retries(scripted):
    def respond(n, body, headers):
        if n == 0:
            return 503, b'{"error": {"message": "warming up"}}', {}, 0.0
        if n == 1:
            return 429, b"slow down", {"Retry-After": "0"}, 0.0
        return ok("fine")

    url, script = scripted(respond)
    assert [g.text for g in backend(url).generate([CONV], PARAMS)] == ["fine"]
    assert len(script.requests) == 3


def test_4xx_is_not_retried_and_names_the_problem(scripted):
    err = {"error": {"message": "field 'temperature': must be a number in [0, 2]", "type": "BadRequestError"}}
    url, script = scripted(lambda n, body, headers: (400, json.dumps(err).encode(), {}, 0.0))
    with pytest.raises(LLMServerError) as e:
        backend(url).generate([CONV], PARAMS)
    assert_one_line(e.value, url, "HTTP 400", "field 'temperature'")
    assert len(script.requests) == 1


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


def test_connection_refused_names_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    with pytest.raises(LLMServerError) as e:
        backend(url).generate([CONV, CONV, CONV], PARAMS)
    assert_one_line(e.value, url, "connection refused", "llm.base_url")
    assert time.monotonic() - t0 < 2  # refused is not retried


def test_timeout_names_the_limit(scripted):
    url, _ = scripted(lambda n, body, headers: ok("late", delay=1.5))
    with pytest.raises(LLMServerError) as e:
        backend(url, timeout_s=0.3).generate([CONV], PARAMS)
    assert_one_line(e.value, url, "no response within 0.3 s", "llm.timeout_s")


def test_dropped_connections_are_retried(scripted):
    url, script = scripted(lambda n, body, headers: (None, b"", {}, 0.0) if n < 2 else ok("back"))
    assert backend(url).generate([CONV], PARAMS)[0].text == "back"
    url, script = scripted(lambda n, body, headers: (None, b"", {}, 0.0))
    with pytest.raises(LLMServerError) as e:
        backend(url, max_retries=1).generate([CONV], PARAMS)
    assert_one_line(e.value, url, "connection dropped", "after 2 attempts")
    assert len(script.requests) == 2


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
    assert body["prompt"] == render_chatml(CONV, "[") + " yes" and body["echo"] is True
    # a chat-only server: the error says what score() needs
    url2, _ = scripted(lambda n, body, headers: (404, b'{"detail": "Not Found"}', {}, 0.0))
    with pytest.raises(LLMServerError, match=r"HTTP 404.*does not return prompt logprobs") as e:
        backend(url2).score([CONV], [" yes"])
    assert "/v1/completions" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="1 conversations for 2 continuations"):
        b.score([CONV], ["a", "b"])


def test_server_validates_scoring_requests():
    from lane_ray.llm.openai_server import parse_completion_request

    good = {"model": "m", "prompt": "hello", "echo": True, "logprobs": 1, "max_tokens": 1}
    assert parse_completion_request(good, "m") == "hello"
    assert parse_completion_request({**good, "prompt": ["hi"], "max_tokens": 0}, "m") == "hi"
    for change, name, status in (({"echo": False}, "echo", 400), ({"logprobs": None}, "logprobs", 400),
                                 ({"max_tokens": 16}, "max_tokens", 400), ({"prompt": ""}, "prompt", 400),
                                 ({"model": "other"}, "model", 404)):
        with pytest.raises(RequestError) as e:
            parse_completion_request({**good, **change}, "m")
        assert e.value.param == name and e.value.status == status and f"field '{name}'" in str(e.value)
