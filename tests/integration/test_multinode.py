"""LANE on a multi-node Ray cluster: a head that runs no tasks and three 1-CPU worker nodes, each its own raylet
with its own object store, on this machine (tests/multinode_cluster.py, ``ray.cluster_utils.Cluster``).

- `lane run` with its driver there gives the metrics of `lane run` on one node (`lane submit` to a head:
  test_submit.py).
- A worker node killed (SIGKILL of its raylet, object store and workers) in the middle of training (Ray Train,
  ``FailureConfig``), catalogue embedding and preference extraction (Ray Data): the stage finishes on the nodes
  left, every row is written exactly once, and the result equals the undisturbed run's.
- A Serve app with Ranker replicas on two nodes: one node killed under load fails only the requests in flight.
- A run directory on the local S3 server, written by actors on worker nodes.

The drivers are subprocesses connected to this cluster (``RAY_ADDRESS``); the session's own cluster is left alone.
Timings and the pass record: docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.multinode import ROOT, MultiNodeCluster

pytestmark = [pytest.mark.integration, pytest.mark.multinode]
WORKERS = ("w1", "w2", "w3")


@pytest.fixture(scope="module")
def cluster():
    c = MultiNodeCluster(head_cpus=0)
    try:
        for name in WORKERS:
            c.add(name, cpus=1)
        yield c
    finally:
        c.close()


def _restore(cluster: MultiNodeCluster) -> None:
    """Bring the cluster back to three worker nodes after a test killed one (a new node under the old name)."""
    for name in WORKERS:
        if name not in cluster.node_ids:
            cluster.add(name, cpus=1)


def _lane(cluster: MultiNodeCluster, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lane_ray.cli", *args], env=cluster.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _kill_a_node_running(cluster: MultiNodeCluster, actor_class: str, when, timeout_s: float = 300) -> str:
    """Once ``when()`` holds, SIGKILL a worker node that runs an actor of ``actor_class``; its name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if when():
            hosts = [n for n in cluster.actor_nodes(actor_class) if n in WORKERS]
            if hosts:
                cluster.kill(hosts[0])
                return hosts[0]
        time.sleep(0.5)
    raise AssertionError(f"no {actor_class} actor on a worker node in time")


def _killed_during(cluster: MultiNodeCluster, actor_class: str, when, *args: str) -> str:
    """`lane *args` on this cluster, with a worker node that runs an ``actor_class`` actor killed once ``when()``
    holds; asserts the command still succeeds and returns the killed node's name."""
    proc = subprocess.Popen([sys.executable, "-m", "lane_ray.cli", *args], env=cluster.env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_a_node_running(cluster, actor_class, when)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return killed


def test_pipeline_on_three_nodes_matches_one_node(cluster, pipeline_run, tmp_path):
    """`lane run` with its driver on this cluster (``RAY_ADDRESS``): the stages spread over the worker nodes (the
    head runs no tasks), and the metrics equal the session's one-node `lane run` with the same seed."""
    assert pipeline_run.rc == 0, pipeline_run.stderr[-4000:]
    # no explanation stage: it is covered on one node (pipeline_run, test_explain.py)
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = _lane(cluster, *pipeline_run.args("--set", "run.explain_users=0"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for artifact in ("metrics.json", "timings.json", "report/report.md", "checkpoints/lane/config.json",
                     "preferences.parquet", "candidates.parquet"):
        assert (out / artifact).exists(), artifact
    got, local = json.loads((out / "metrics.json").read_text()), pipeline_run.metrics
    for key in ("sasrec/id/seed0", "sasrec/lane/seed0"):
        for proto in ("full", "sampled100"):
            for metric, value in local[key][proto].items():
                assert got[key][proto][metric] == pytest.approx(value, abs=1e-6), (key, proto, metric)
    print(f"lane run on three worker nodes took {time.monotonic() - t0:.0f} s")


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory) -> Path:
    """Synthetic data (60 users, 2,000 items, so embedding takes a while): written here, no Ray."""
    from lane_ray.cli import main

    run = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--items", "2000", "--users", "60", "--out", str(run), "-q"]) == 0
    return run


TRAIN = ("--variant", "id", "--workers", "2", "--epochs", "5", "--patience", "5", "-q",
         "--set", "train.max_failures=3", "--set", "train.threads_per_worker=1", "--set", "train.hidden=16",
         "--set", "train.layers=1", "--set", "train.max_len=10", "--set", "train.batch_size=8")


def test_worker_node_killed_mid_training_resumes_on_the_nodes_left(cluster, synth_run, tmp_path):
    """Two Ray Train workers on two of the three worker nodes; the node of one is killed after the second epoch's
    checkpoint. Ray Train restarts the workers on the nodes left and resumes from the last checkpoint: every epoch
    once in the curve, and the same losses, validation and test metrics as the undisturbed run."""
    _restore(cluster)
    calm_dir, hit_dir = tmp_path / "calm", tmp_path / "hit"
    calm = _lane(cluster, "train", "--dataset", str(synth_run), "--out", str(calm_dir), *TRAIN)
    assert calm.returncode == 0, calm.stderr[-3000:]
    ckpts = hit_dir / "ray_train" / "sasrec-id-seed0"
    killed = _killed_during(cluster, "RayTrainWorker", lambda: len(list(ckpts.glob("checkpoint_*"))) >= 2,
                            "train", "--dataset", str(synth_run), "--out", str(hit_dir), *TRAIN)
    a = json.loads((calm_dir / "curves" / "sasrec-id-seed0.json").read_text())
    b = json.loads((hit_dir / "curves" / "sasrec-id-seed0.json").read_text())
    assert [c["epoch"] for c in b["curve"]] == [c["epoch"] for c in a["curve"]] == list(range(5))
    for x, y in zip(a["curve"], b["curve"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["valid"]["full"]["ndcg@10"] == pytest.approx(y["valid"]["full"]["ndcg@10"], abs=1e-6)
    ma, mb = (json.loads((d / "metrics.json").read_text())["sasrec/id/seed0"] for d in (calm_dir, hit_dir))
    for proto in ("full", "sampled100"):
        for metric, value in ma[proto].items():
            assert mb[proto][metric] == pytest.approx(value, abs=1e-6), (proto, metric)
    print(f"killed {killed} mid-training")
    _restore(cluster)


def test_worker_node_killed_mid_embedding_writes_every_title_once(cluster, synth_run, tmp_path):
    """Encoder actors on two of the three worker nodes (the third keeps a CPU for reading); the node of one is
    killed once the first parts are written. The stage finishes on the nodes left: every title is embedded exactly
    once, with the vectors of the undisturbed run."""
    from lane_ray.io import read_parquet

    _restore(cluster)
    embed = ("--catalog", str(synth_run / "data" / "catalog.parquet"), "-q", "--set", "embed.rows_per_batch=200",
             "--set", "embed.max_actors=2")
    calm = _lane(cluster, "embed", "--out", str(tmp_path / "calm.parquet"), *embed)
    assert calm.returncode == 0, calm.stderr[-3000:]
    hit_out = tmp_path / "hit.parquet"
    killed = _killed_during(cluster, "EncodeBatch", lambda: len(list(hit_out.glob("part-*.parquet"))) >= 2,
                            "embed", "--out", str(hit_out), *embed)
    catalog = read_parquet(synth_run / "data" / "catalog.parquet")
    a, b = read_parquet(tmp_path / "calm.parquet"), read_parquet(hit_out)
    ids = b["item_id"].to_numpy()
    assert len(ids) == len(np.unique(ids)) == catalog.num_rows  # every title once: nothing lost, nothing twice
    manifest = json.loads((hit_out / "_manifest.json").read_text())
    assert manifest["rows"] == catalog.num_rows
    va = dict(zip(a["item_id"].to_pylist(), a["embedding"].to_numpy(zero_copy_only=False), strict=True))
    for i, v in zip(ids, b["embedding"].to_numpy(zero_copy_only=False), strict=True):
        np.testing.assert_allclose(v, va[i], atol=1e-5)
    print(f"killed {killed} mid-embedding; {manifest['counts']}")
    _restore(cluster)


_DEPLOY = r"""
import sys
import ray
from ray import serve
from serve.app import build_app, wait_healthy

run_dir, port = sys.argv[1], int(sys.argv[2])
ray.init(log_to_driver=False)  # RAY_ADDRESS: the multi-node cluster
serve.start(http_options={"host": "127.0.0.1", "port": port}, detached=True)
serve.run(build_app({"run_dir": run_dir, "set": sys.argv[3:]}), name="lane", route_prefix="/", blocking=False)
print(wait_healthy(f"http://127.0.0.1:{port}")["status"], flush=True)
"""

_UNDEPLOY = "import ray; from ray import serve; ray.init(log_to_driver=False); serve.shutdown()"


def test_serve_node_killed_under_load_fails_only_requests_in_flight(cluster, serving_run):
    """Two Ranker replicas, one CPU-heavy replica per worker node (0.6 CPU of 1): the node of one is killed while
    four clients send requests. Only requests in flight there fail; the other replica keeps answering, and Serve
    starts a replacement on a node with room once one joins."""
    from tests.integration.test_serve import LOAD_CLIENTS, call, free_port, under_load

    _restore(cluster)
    port = free_port()
    overrides = ["llm.backend=openai", f"llm.base_url=http://127.0.0.1:{free_port()}/v1", "llm.request_retries=0",
                 "serve.ranker_replicas=2", "serve.ranker_num_cpus=0.6", "serve.explainer_num_cpus=0.1"]
    dep = subprocess.run([sys.executable, "-c", _DEPLOY, str(serving_run), str(port), *overrides], env=cluster.env,
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert dep.returncode == 0 and "ok" in dep.stdout, dep.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while len(cluster.actor_nodes("Ranker")) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        hosts = cluster.actor_nodes("Ranker")
        assert len(hosts) == 2 and "head" not in hosts, hosts  # one replica on each of two worker nodes
        before, after = under_load(url, lambda: cluster.kill(hosts[0]), before_s=5, after_s=15)
        clients = LOAD_CLIENTS
        failed = [s for s in after if s != 200]
        print(f"node {hosts[0]} killed under load: {len(before)} requests before, {len(after)} after, "
              f"{len(failed)} failed {failed}")
        assert before and set(before) == {200}
        assert len(failed) <= clients  # at most the requests in flight on the killed node
        assert after.count(200) > 5 * clients  # the replica on the other node kept answering
        _restore(cluster)  # a node with room: Serve starts the replacement replica there
        deadline = time.monotonic() + 180
        while len(cluster.actor_nodes("Ranker")) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(cluster.actor_nodes("Ranker")) == 2
        assert call(url, "/v1/recommend", {"user_id": 1, "k": 3})[0] == 200
    finally:
        subprocess.run([sys.executable, "-c", _UNDEPLOY], env=cluster.env, cwd=ROOT, capture_output=True, timeout=300)


def test_run_directory_on_s3_written_by_workers_on_other_nodes(cluster, tmp_path):
    """A run directory in a bucket of the local S3 server: the driver on the head (which runs no tasks) prepares
    the data there, and the encoder actors, all on worker nodes, write their parts straight into the bucket."""
    pafs = pytest.importorskip("pyarrow.fs")
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.parquet as pq

    from lane_ray.cli import main

    _restore(cluster)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"{host}:{port}",
                               scheme="http", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("lane-runs")
        uri = f"s3://test:test@lane-runs/mn?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        src = tmp_path / "src"
        assert main(["data", "synth", "--items", "600", "--users", "40", "--out", str(src), "-q"]) == 0
        env = {**cluster.env, "LANE_STAGE_DIR": str(tmp_path / "stage")}
        for args in (["data", "prepare", str(src)], ["embed", "--set", "embed.rows_per_batch=128"]):
            proc = subprocess.run([sys.executable, "-m", "lane_ray.cli", *args, "--out", uri, "-q"], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        sel = pafs.FileSelector("lane-runs/mn/item_embeddings.parquet", allow_not_found=True)
        parts = [i.path for i in fs.get_file_info(sel) if i.path.rsplit("/", 1)[-1].startswith("part-")]
        rows = 0
        for p in parts:
            with fs.open_input_file(p) as fh:
                rows += pq.read_metadata(fh).num_rows
        with fs.open_input_file("lane-runs/mn/data/catalog.parquet") as fh:
            titles = pq.read_metadata(fh).num_rows
        assert len(parts) >= 2 and rows == titles > 0, (len(parts), rows, titles)  # every title, once
    finally:
        server.stop()


PREFS = ("--max-users", "8", "-q", "--set", "preferences.batch_size=2", "--set", "preferences.max_actors=2",
         "--set", "preferences.m=3", "--set", "llm.threads_per_actor=1", "--set", "preferences.embed=false")


def test_worker_node_killed_mid_preferences_asks_the_llm_once_per_user(cluster, tmp_path):
    """LLM actors (the packaged SmolLM2) on two worker nodes; the node of one is killed once the first batch is
    written. The stage finishes on the nodes left: every user once, with the preferences of the undisturbed run
    (a lost batch is generated again, the same way)."""
    from lane_ray.io import read_parquet

    _restore(cluster)
    calm = _lane(cluster, "preferences", "--out", str(tmp_path / "calm"), *PREFS)
    assert calm.returncode == 0, calm.stderr[-3000:]
    hit_dir = tmp_path / "hit"
    parts = hit_dir / "preferences.parquet"
    killed = _killed_during(cluster, "ExtractBatch", lambda: len(list(parts.glob("part-*.parquet"))) >= 1,
                            "preferences", "--out", str(hit_dir), *PREFS)
    a, b = (read_parquet(d / "preferences.parquet").sort_by("user_id") for d in (tmp_path / "calm", hit_dir))
    assert b["user_id"].to_pylist() == a["user_id"].to_pylist() and b.num_rows == 8  # each user once
    assert b["preferences"].to_pylist() == a["preferences"].to_pylist()
    print(f"killed {killed} mid-preferences")
    _restore(cluster)
