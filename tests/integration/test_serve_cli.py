"""`lane serve` as a user runs it: a separate process (here joining the session's cluster through RAY_ADDRESS)
that prints the URL, answers on 127.0.0.1, and stops cleanly on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.test_serve import free_port
from tests.serving_run import CHECKPOINT

pytestmark = [pytest.mark.integration, pytest.mark.network]
pytest.importorskip("torch")


def test_lane_serve_prints_url_answers_and_stops(ray_cluster, serving_run, tmp_path):
    from ray import serve

    serve.shutdown()  # the Serve instance of another module (its HTTP port) must not be reused
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen([sys.executable, "-m", "lane_ray.cli", "serve", "--run", str(serving_run), "--port",
                             str(port), "--set", "llm.backend=openai", "--set", "llm.base_url=http://127.0.0.1:9/v1",
                             "--set", "serve.graceful_shutdown_s=1"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        url = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("http://"):
                url = line.strip()
                break
        assert url == f"http://127.0.0.1:{port}/", (url, open(tmp_path / "serve.log").read()[-3000:])
        with urllib.request.urlopen(url + "healthz", timeout=30) as r:
            assert json.loads(r.read())["model"] == CHECKPOINT
        req = urllib.request.Request(url + "v1/recommend", data=json.dumps({"user_id": 1, "k": 3}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(json.loads(r.read())["items"]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
