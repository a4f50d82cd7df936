"""Faults injected into real runs on the session's local Ray cluster: a killed encoder actor, an LLM server that
answers garbage, a driver SIGKILLed half way. Nothing is lost, nothing is done twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lane_ray.config import EmbedConfig, RayConfig
from lane_ray.io import read_parquet
from lane_ray.pipeline.embed import embed_texts
from tests.conftest import descendant_pids, write

STATUSES = {"ok", "repaired", "fallback"}

# ------------------------------------------------------------------------------------------- embedding


def test_killed_encoder_actor_the_job_completes_every_item_once(ray_cluster, tmp_path):
    from lane_ray.data.synth import item_titles

    n = 3000
    ids = np.arange(1, n + 1, dtype=np.int64)
    titles = item_titles(ids, 18, 0)[0]
    cat = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"item_id": ids, "title": titles}), cat)
    out = tmp_path / "item_embeddings.parquet"
    result: dict = {}

    def job():
        try:
            result["manifest"] = embed_texts(cat, out, EmbedConfig(device="cpu", rows_per_batch=100, batch_size=50,
                                                                   max_actors=1), RayConfig())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    t = threading.Thread(target=job)
    t.start()
    killed = 0
    deadline = time.monotonic() + 300
    while t.is_alive() and time.monotonic() < deadline and not killed:
        parts = list(out.glob("part-*.parquet")) if out.exists() else []
        pids = descendant_pids("EncodeBatch")
        if pids and len(parts) >= 2:  # mid-job: some blocks written, most still to come
            os.kill(pids[0], signal.SIGKILL)
            killed += 1
        time.sleep(0.2)
    t.join(timeout=600)
    assert killed == 1, "the actor was never seen alive mid-job"
    assert "error" not in result, result.get("error")
    m = result["manifest"]
    assert m["rows"] == n and m["embedded_now"] == n
    t_out = read_parquet(out)
    got = t_out["item_id"].to_pylist()
    assert sorted(got) == ids.tolist()  # every item, exactly once (a retried block's duplicate is compacted away)
    print(f"encoder actor SIGKILL: {n} items, {len(got)} rows out, {len(set(got))} distinct, "
          f"{m['counts'].get('removed_duplicates', 0)} duplicate rows compacted")
    vecs = np.stack(t_out["embedding"].to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


# ------------------------------------------------------------------------------------------------- LLM

GARBAGE = ["", "no json here at all", '{"preferences": 7}', '["just one"]', "\x00\x01\x02 \u202e weird",
           '{"preferences": ["a", "a", "a", "a", "a"]}', "]]]]", '{"preferences": ["x"' + ', "y"' * 40 + "]}"]


class FaultyLLM:
    """An OpenAI-compatible chat server answering garbage (cycling through GARBAGE), after ``delay`` seconds;
    counts requests per user prompt (the first user message: the same for a user's retries)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
                key = hashlib.sha1(prompt.encode()).hexdigest()
                with outer.lock:
                    outer.calls[key] = outer.calls.get(key, 0) + 1
                    k = sum(outer.calls.values())
                time.sleep(outer.delay)
                reply = {"choices": [{"message": {"role": "assistant", "content": GARBAGE[k % len(GARBAGE)]},
                                      "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def many_users(tmp_path) -> Path:
    """An ml-100k-format dataset: 12 users, 4-6 of 10 movies each."""
    d = tmp_path / "ml-12"
    movies = ["Heat (1995)", "Casino (1995)", "Fargo (1996)", "Contact (1997)", "Titanic (1997)", "Alien (1979)",
              "Babe (1995)", "Se7en (1995)", "Clerks (1994)", "Rocky (1976)"]
    flags = "|".join("0" for _ in range(19))
    write(d / "u.item", "".join(f"{i + 1}|{t}|01-Jan-{t[-5:-1]}||http://x|{flags}\n" for i, t in enumerate(movies))
          .encode("latin-1"))
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, 13):
        for k, i in enumerate(rng.choice(10, size=4 + u % 3, replace=False)):
            rows.append(f"{u}\t{i + 1}\t4\t{100 * k + u}\n")
    write(d / "u.data", "".join(rows))
    return d


def _openai(server: FaultyLLM) -> list[str]:
    return ["--set", "llm.backend=openai", "--set", f"llm.base_url={server.base_url}", "--set", "llm.model=faulty",
            "--set", "llm.constraint_format=none",  # a garbage server enforces nothing: auto would refuse it
            "--set", "llm.request_retries=0", "--set", "preferences.max_retries=1", "--set", "preferences.embed=false",
            "--set", "preferences.batch_size=1", "--set", "ray.num_cpus=2"]


def _prefs(run: Path) -> list[dict]:
    return read_parquet(run / "preferences.parquet").to_pylist()


def test_garbage_from_the_llm_ends_repaired_or_fallback_never_lost(ray_cluster, many_users, tmp_path, capsys):
    from lane_ray.cli import main

    server = FaultyLLM()
    try:
        run = tmp_path / "run"
        assert main(["preferences", "--dataset", str(many_users), "--out", str(run), *_openai(server)]) == 0
    finally:
        server.stop()
    rows = _prefs(run)
    assert sorted(r["user_id"] for r in rows) == list(range(1, 13))  # every user once
    assert {r["status"] for r in rows} <= STATUSES and any(r["status"] == "fallback" for r in rows)
    for r in rows:
        assert len(r["preferences"]) == 5 and all(isinstance(p, str) and p.strip() for p in r["preferences"])
    assert len(server.calls) == 12 and all(1 <= c <= 2 for c in server.calls.values())  # 1 try + 1 retry
    statuses = {s: sum(r["status"] == s for r in rows) for s in sorted(STATUSES)}
    print(f"garbage LLM: 12 users, {sum(server.calls.values())} requests, statuses {statuses}")


def test_driver_killed_half_way_resumes_without_asking_the_llm_again(ray_cluster, many_users, tmp_path):
    server = FaultyLLM(delay=0.5)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lane_ray.cli", "preferences", "--dataset", str(many_users), "--out", str(run),
           *_openai(server), "--set", "preferences.max_retries=0", "-q"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        parts_dir = run / "preferences.parquet"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(parts_dir.glob("part-*.parquet"))) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(3)  # Ray ends the dead driver's actors; a part they were renaming lands before we count
        done_first = {r for p in parts_dir.glob("part-*.parquet") for r in pq.read_table(p)["user_id"].to_pylist()}
        assert 3 <= len(done_first) < 12
        calls_first = dict(server.calls)
        rc = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        assert rc.returncode == 0, rc.stderr.decode()[-2000:]
    finally:
        server.stop()
    rows = _prefs(run)
    assert sorted(r["user_id"] for r in rows) == list(range(1, 13))  # nobody missing, nobody twice
    asked_again = {k for k, c in server.calls.items() if c > calls_first.get(k, 0)}
    # the second run asked only for the users the first did not finish (one request each: no retries here)
    assert len(asked_again) == 12 - len(done_first)
    assert sum(server.calls.values()) - sum(calls_first.values()) == 12 - len(done_first)
    print(f"driver SIGKILL: {len(done_first)} of 12 users finished before the kill; the re-run asked the LLM "
          f"{sum(server.calls.values()) - sum(calls_first.values())} times")


# ------------------------------------------------------------------------------- preference cache compaction

_COMPACT_AND_DIE = """
import os, pathlib, signal, sys
from lane_ray.config import load_config
from lane_ray.data import load_dataset
from lane_ray.llm.preferences import settings_from_config
from lane_ray.pipeline.preferences import run_preferences, user_histories

cfg = load_config(None, [], {"data.dataset": sys.argv[1]})
prepared = load_dataset(cfg.data)
users = user_histories(prepared.interactions, prepared.catalog)
settings = settings_from_config(cfg.preferences, prepared.catalog)
unlink = pathlib.Path.unlink

def unlink_then_die(self, *a, **k):  # the first part removed by the compaction, then SIGKILL
    unlink(self, *a, **k)
    if self.name.startswith("part-"):
        os.kill(os.getpid(), signal.SIGKILL)

pathlib.Path.unlink = unlink_then_die
run_preferences(users, pathlib.Path(sys.argv[2]), "transformers", {}, settings, "cached-model", 8, 1, 1.0, 0.0,
                use_ray=False)
"""


def test_process_killed_inside_the_compaction_window_loses_no_cached_preference(many_users, tmp_path):
    """The preference stage drops stale rows by rewriting its parts. A process SIGKILLed right after it removed
    the first old part keeps every current row (the survivors were written before anything was removed), and the
    next run serves every user from the cache with no LLM at all."""
    from lane_ray.config import load_config
    from lane_ray.data import load_dataset
    from lane_ray.llm.preferences import settings_from_config
    from lane_ray.pipeline.preferences import PREFERENCES_SCHEMA, run_preferences, user_histories
    from lane_ray.pipeline.sink import part_files, write_part

    cfg = load_config(None, [], {"data.dataset": str(many_users)})
    prepared = load_dataset(cfg.data)
    users = user_histories(prepared.interactions, prepared.catalog)
    s = settings_from_config(cfg.preferences, prepared.catalog)
    out = tmp_path / "preferences"
    out.mkdir()

    def rows(us, version):
        return pa.Table.from_pylist([{
            "user_id": u.user_id, "preferences": [f"pref {u.user_id} {k}" for k in range(s.m)], "status": "ok",
            "history_sha1": u.sha1(s.with_attributes), "model": "cached-model", "prompt_version": version,
            "raw": "", "new_tokens": 0, "rejected": "{}"} for u in us], schema=PREFERENCES_SCHEMA)

    # two parts of current rows, each with stale rows of an older prompt version the compaction drops
    half = len(users) // 2
    write_part(out, pa.concat_tables([rows(users[:half], s.prompt_version), rows(users[:2], "old-version")]))
    write_part(out, pa.concat_tables([rows(users[half:], s.prompt_version), rows(users[-2:], "old-version")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _COMPACT_AND_DIE, str(many_users), str(out)], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    survivors = read_parquet(out)
    current = survivors.filter(pa.compute.equal(survivors["prompt_version"], s.prompt_version))
    assert set(current["user_id"].to_pylist()) == {u.user_id for u in users}, "a cached preference was lost"
    assert len(part_files(out)) == 2  # the compacted part and the old part not yet removed
    # the next run: everything cached (an LLM call would fail: the backend kwargs name no model), compacted
    manifest = run_preferences(users, out, "openai", {"base_url": "http://127.0.0.1:9/v1"}, s, "cached-model", 8, 1,
                               1.0, 0.0, use_ray=False)
    assert manifest["cached"] == len(users) and manifest["extracted_now"] == 0
    final = read_parquet(out)
    assert sorted(final["user_id"].to_pylist()) == sorted(u.user_id for u in users)  # once each
    assert set(final["prompt_version"].to_pylist()) == {s.prompt_version}
