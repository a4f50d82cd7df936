"""`lane submit` against a real Ray head this test starts (`ray start --head` on 127.0.0.1, dashboard on a free
port): the pipeline on a tiny MovieLens copy runs as a job, succeeds, writes its artifacts, and gives the same
metrics as `lane run` in-process with the same seed. Only the head started here is stopped (its processes are
found by its own temp dir), never another cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.test_serve import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _stop_head(temp_dir: Path) -> None:
    mine = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp_dir) in a for a in (p.info["cmdline"] or []))]
    for p in mine:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=5)  # what ignores SIGTERM this long is killed
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _start_head(temp: Path, env: dict) -> str:
    """`ray start --head` with every port it would otherwise take from a fixed default (the session's own cluster
    or one still shutting down may hold those) set to a free one; a port taken between the probe and the start
    gives a fresh set, and the last failure shows what `ray start` printed."""
    ray = str(Path(sys.executable).parent / "ray")
    names = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    for _ in range(3):
        ports: dict[str, int] = {}
        while len(set(ports.values())) < len(names):
            ports = {name: free_port() for name in names}
        proc = subprocess.run([ray, "start", "--head", "--num-cpus=2", "--include-dashboard=true",
                               "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--object-store-memory=300000000",
                               "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())],
                              env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return f"http://127.0.0.1:{ports['dashboard-port']}"
        _stop_head(temp)
    raise RuntimeError(f"ray start --head failed 3 times; last output:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture
def head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    address = _start_head(temp, env)
    try:
        yield address, env
    finally:
        _stop_head(temp)


def test_submitted_pipeline_succeeds_and_matches_lane_run(head, pipeline_run, tmp_path):
    address, env = head
    assert pipeline_run.rc == 0, pipeline_run.stderr[-4000:]
    # no explanation stage in the job: it is covered in-process (pipeline_run, test_explain.py)
    args = pipeline_run.args("--set", "run.explain_users=0")
    job_out = tmp_path / "job"
    t0 = time.monotonic()
    # the address from $RAY_ADDRESS, as `ray job submit` takes it
    proc = subprocess.run([sys.executable, "-m", "lane_ray.cli", "submit", "--timeout", "900",
                           "--", *args, "--out", str(job_out)], env={**env, "RAY_ADDRESS": address}, cwd=ROOT,
                          capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job_id = proc.stdout.split()[0]
    assert f"{job_id}: SUCCEEDED" in proc.stdout, proc.stdout
    assert "[lane]" in proc.stderr and "train" in proc.stderr, proc.stderr[-2000:]  # the job's own log, streamed
    for artifact in ("metrics.json", "timings.json", "report/report.md", "checkpoints/lane/config.json",
                     "preferences.parquet", "candidates.parquet"):
        assert (job_out / artifact).exists(), artifact
    assert not (job_out / "explanations.parquet").exists()
    took = time.monotonic() - t0
    # the same seed in-process (the session's pipeline run) gives the same metrics
    job, local = json.loads((job_out / "metrics.json").read_text()), pipeline_run.metrics
    for key in ("sasrec/id/seed0", "sasrec/lane/seed0"):
        for proto in ("full", "sampled100"):
            for metric, value in local[key][proto].items():
                assert job[key][proto][metric] == pytest.approx(value, abs=1e-6), (key, proto, metric)
    print(f"job took {took:.0f} s")
