"""Stages ask Ray for the nodes they need and wait for them (lane_ray/pipeline/cluster.py wait_for_resources):
on a cluster that gains the node late, the stage starts when it joins; where it never comes, one line names the
resource. The late node joins a multi-node test cluster (tests/multinode_cluster.py, ``ray.cluster_utils.Cluster``)
run by a child process, so the session's own cluster is left alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

_DRIVER = r"""
import sys
from pathlib import Path
import ray

from lane_ray.config import RayConfig, SynthConfig, TrainConfig
from lane_ray.data.synth import generate
from lane_ray.llm.vllm_backend import wait_for_gpus
from lane_ray.pipeline.train import train_variant
from lane_ray.train.features import load_features

run = Path(sys.argv[1])
ray.init(log_to_driver=False)  # RAY_ADDRESS: the test cluster
generate(SynthConfig(items=40, users=30, mean_session_len=6, seed=2), run)
feats = load_features(run, titles=False, preferences=False)
tc = TrainConfig(variant="id", hidden=16, layers=1, max_len=8, epochs=1, batch_size=16, num_workers=2,
                 cpus_per_worker=1.0, threads_per_worker=1)
summary = train_variant(tc, RayConfig(resource_wait_s=300), run, feats)
print(f"TRAINED {summary['epochs']} epoch(s)", flush=True)
wait_for_gpus(1, timeout_s=5)  # the late node brought a GPU
print("GPU FOUND", flush=True)
"""


def test_train_waits_for_a_node_that_joins_late(tmp_path):
    """Two Ray Train workers of 1 CPU on a cluster with one 1-CPU node: the stage waits, with a progress line
    naming what it waits for, until a second node joins; then it trains, and the vLLM backend finds the GPU that
    node brought."""
    import threading

    from tests.multinode import MultiNodeCluster

    cluster = MultiNodeCluster(head_cpus=1)
    try:
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "run")],
                                env={**cluster.env, "LANE_PROGRESS_INTERVAL": "2"}, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        waiting = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "waiting for 2 CPU" in line:
                    waiting.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert waiting.wait(300), "".join(lines)[-3000:]
        cluster.add("late", cpus=1, gpus=1)
        proc.wait(timeout=600)
        reader.join(timeout=30)
        out = "".join(lines)
        assert proc.returncode == 0, out[-3000:]
        assert "waiting for 2 CPU (2 x 1 CPU): the cluster has 1 CPU on 1 node(s)" in out
        assert "the cluster holds 2 CPU (2 x 1 CPU) now" in out
        assert "TRAINED 1 epoch(s)" in out and "GPU FOUND" in out
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        cluster.close()


def test_resource_that_never_comes_is_one_line_error(ray_cluster):
    """The session's cluster has no GPU: the vLLM backend names the GPUs it needs after the wait."""
    from lane_ray.llm.vllm_backend import VLLMError, wait_for_gpus

    with pytest.raises(VLLMError, match="needs 2 GPU; none in the cluster yet") as info:
        wait_for_gpus(2, timeout_s=0.5)
    assert "\n" not in str(info.value) and "llm.backend=transformers" in str(info.value)
