"""cluster/: every file loads and has the documented structure: a CPU head, CPU and GPU worker groups with
resources and autoscaling limits, the same worker groups in the three KubeRay manifests, and entry points and an
import path that exist in this repository."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_cluster_launcher_yaml():
    doc = _load("lane-cluster.yaml")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types and types[doc["head_node_type"]]["resources"] == {"CPU": 0}
    cpu = [t for n, t in types.items() if n != doc["head_node_type"] and "GPU" not in t["resources"]]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu
    for t in cpu + gpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["resources"]["CPU"] > 0
    assert doc["max_workers"] >= max(t["max_workers"] for t in cpu + gpu)
    assert any("[gpu,ann]" in c for c in doc["setup_commands"])
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]]


def _groups(spec: dict) -> dict[str, dict]:
    out = {}
    for g in spec["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        out[g["groupName"]] = {"min": g["minReplicas"], "max": g["maxReplicas"], "requests": res["requests"],
                               "limits": res["limits"]}
    return out


@pytest.mark.parametrize("name, kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob"),
                                        ("kuberay/rayservice.yaml", "RayService")])
def test_kuberay_manifests_share_worker_groups(name, kind):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == importlib.import_module("ray").__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(spec)
    assert groups == _groups(_cluster_spec(_load("kuberay/raycluster.yaml")))
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    assert groups["gpu-workers"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["cpu-workers"]["limits"]
    for g in groups.values():
        assert 0 <= g["min"] <= g["max"] and g["requests"] == g["limits"]


def test_rayjob_entrypoint_runs_a_job_of_this_repo():
    argv = shlex.split(_load("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file() and argv[1].startswith("jobs/")
    from lane_ray.cli import build_parser

    build_parser().parse_args(["run", *argv[2:]])  # the flags are ones `lane run` takes


def test_rayservice_serve_config_builds_our_app():
    from ray.serve.schema import ServeDeploySchema

    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(_load("kuberay/rayservice.yaml")["spec"]
                                                                ["serveConfigV2"]))
    (app,) = serve_cfg.applications
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert set(app.args) <= {"run_dir", "config", "set"}


def test_dockerfile_installs_the_gpu_extra_and_copies_the_code():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "[gpu,ann]" in text
    for folder in ("lane_ray", "jobs", "serve"):
        assert f"COPY {folder} ./{folder}" in text
