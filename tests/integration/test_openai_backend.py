"""The ``openai`` backend against a real server: ``python -m lane_ray.llm.openai_server`` with the packaged
SmolLM2 on a free port of 127.0.0.1 (one process for the module; loading takes 15-60 s on a busy machine).
Generations are kept to a few tokens: these tests check the plumbing, not the model's taste."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lane_ray.errors import LaneError
from lane_ray.llm.backend import FreeText, GenerationParams, Template, Text, json_string_array
from lane_ray.llm.openai_backend import LLMServerError, OpenAIBackend, build_openai_http_processor

pytestmark = [pytest.mark.integration, pytest.mark.network]

MODEL = "smollm2-135m-instruct"
GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0)
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class ServerProcess:
    """The server as a user starts it, in its own process; ``stop`` ends it (the last test does)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "lane_ray.llm.openai_server", "--model", MODEL, "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", "2", "--max-batch-size", "8", "--batch-wait-ms", "20"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                get_json(f"http://127.0.0.1:{self.port}/health", timeout=1.0)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"server not ready after {START_TIMEOUT_S} s: {self.log.read_text()[-2000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def generate_calls(self) -> int:
        return get_json(f"http://127.0.0.1:{self.port}/health")["generate_calls"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lane_ray.llm.transformers_backend import LLMNotFoundError, locate_llm

    try:
        locate_llm(MODEL)
    except LLMNotFoundError as e:
        pytest.skip(str(e))
    srv = ServerProcess(tmp_path_factory.mktemp("openai_server") / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def live(server) -> ServerProcess:
    """The module's server, restarted if a test stopped it (only the last test does)."""
    if not server.running:
        server.start()
    return server


@pytest.fixture
def llm(live) -> OpenAIBackend:
    return OpenAIBackend(MODEL, live.base_url, timeout_s=240, max_concurrency=8)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_and_plain_generation(live, llm):
    models = get_json(f"{live.base_url}/models")
    assert [m["id"] for m in models["data"]] == [MODEL]
    [g] = llm.generate([ask("Name a fruit.")], GREEDY)
    assert g.text.strip() and 1 <= g.new_tokens <= 8 and g.finish_reason in ("stop", "length")
    assert g.extra["prompt_tokens"] > 5  # usage comes back from the server
    assert llm.model_id == f"{MODEL}@{live.base_url}"


def test_prefill_is_continued_not_echoed(llm):
    prefill = '{"colour": "'
    t = Template((FreeText(1, 4), Text('"}')))
    [g] = llm.generate([ask("What colour is the sky? Answer as JSON.")], GREEDY, prefill=prefill, constraint=t)
    assert not g.text.startswith(prefill)
    value = json.loads(prefill + g.text)["colour"]
    assert isinstance(value, str) and value.strip()


def test_json_string_array_constraint(llm):
    prefill = '{"preferences": ["'
    t = json_string_array(m=3, min_tokens=1, max_tokens=4)
    params = GenerationParams(max_new_tokens=3 * (4 + 4) + 4, temperature=0.7, seed=1)
    [g] = llm.generate([ask("Give three short movie tastes as JSON.")], params, prefill=prefill, constraint=t)
    prefs = json.loads(prefill + g.text)["preferences"]
    assert len(prefs) == 3 and all(isinstance(p, str) and p for p in prefs), g.text
    assert g.finish_reason == "stop"


def test_eight_concurrent_requests_come_back_in_order_and_batched(live, llm):
    convs = [ask("Say hi" + " please" * k) for k in range(8)]  # prompt lengths grow with k
    before = live.generate_calls()
    gens = llm.generate(convs, GenerationParams(max_new_tokens=4, temperature=0.0))
    assert len(gens) == 8 and all(1 <= g.new_tokens <= 4 for g in gens)
    prompt_tokens = [g.extra["prompt_tokens"] for g in gens]
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == 8  # input order
    assert live.generate_calls() - before < 8  # the server batched them


def test_preference_extraction_through_the_server(llm):
    from lane_ray.llm.preferences import ExtractionSettings, UserHistory, extract_batch
    from lane_ray.llm.prompts import HistoryItem

    users = [
        UserHistory(1, [HistoryItem("Alien (1979)", "Horror|Sci-Fi", "1979"),
                        HistoryItem("Aliens (1986)", "Action|Sci-Fi", "1986"),
                        HistoryItem("The Thing (1982)", "Horror|Sci-Fi", "1982")]),
        UserHistory(2, [HistoryItem("Toy Story (1995)", "Animation|Children's|Comedy", "1995"),
                        HistoryItem("Babe (1995)", "Children's|Comedy|Drama", "1995"),
                        HistoryItem("Aladdin (1992)", "Animation|Children's|Comedy|Musical", "1992")]),
    ]
    s = ExtractionSettings(m=3, budget_tokens=80, max_slot_tokens=4, max_retries=1, seed=3)
    results = extract_batch(users, llm, s)
    assert [r.user_id for r in results] == [1, 2]
    for r in results:
        assert len(r.preferences) == 3 and len(set(r.preferences)) == 3, r
        assert all(isinstance(p, str) and p.strip() for p in r.preferences)
        assert r.status in ("ok", "repaired", "fallback") and r.raw


def test_score_through_the_completions_endpoint(llm):
    conv = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a famous science fiction movie set in space."}]
    got = llm.score([conv, conv, conv], [" Star Wars", " the tax form of a banana", ""], prefill="A:")
    assert got[2] == 0.0 and got[0] < 0 and got[0] > got[1] + 5  # a fitting answer is far likelier
    assert llm.score([conv], [" Star Wars"], prefill="A:") == [got[0]]  # deterministic
    # the same number as the in-process backend (its template renders the same ChatML text for SmolLM2)
    from lane_ray.llm.transformers_backend import TransformersBackend

    local = TransformersBackend(MODEL, num_threads=1)
    assert local.render(conv, "A:") == llm.render(conv, "A:")
    assert got[0] == pytest.approx(local.score([conv], [" Star Wars"], prefill="A:")[0], abs=0.15)


def test_ray_data_http_processor(live, ray_cluster):
    import ray

    t = Template((FreeText(1, 3), Text('"}')))
    processor = build_openai_http_processor(MODEL, live.base_url, GenerationParams(max_new_tokens=6, temperature=0.0),
                                            prefill='{"fruit": "', constraint=t, batch_size=1, concurrency=1,
                                            num_cpus=0.25, timeout_s=240)
    ds = ray.data.from_items([{"user_id": u, "messages": ask(f"Name fruit number {u} as JSON.")} for u in (7, 8)])
    rows = sorted(processor(ds).take_all(), key=lambda r: r["user_id"])
    assert [r["user_id"] for r in rows] == [7, 8]
    for r in rows:
        assert json.loads('{"fruit": "' + r["generated_text"])["fruit"].strip(), r
        assert 1 <= r["new_tokens"] <= 6 and r["finish_reason"] == "stop"


def test_bad_requests_are_named_errors(live):
    with pytest.raises(LLMServerError, match=r"HTTP 400: field 'temperature'"):
        OpenAIBackend(MODEL, live.base_url).generate([ask("hi")], GenerationParams(temperature=5.0))
    with pytest.raises(LLMServerError, match=r"HTTP 404: field 'model'"):
        OpenAIBackend("gpt-4", live.base_url).generate([ask("hi")], GREEDY)


def test_stopped_server_is_a_clear_error(live, llm):
    # keep this test last: it stops the module's server (a later test would pay a restart)
    live.stop()
    with pytest.raises(LaneError) as e:
        llm.generate([ask("hi")] * 3, GREEDY)
    msg = str(e.value)
    assert isinstance(e.value, LLMServerError) and "\n" not in msg
    assert f"{live.base_url}/chat/completions" in msg and "connection refused" in msg
