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


def test_rayservice_api_key_comes_from_the_secret_on_every_container():
    """serve.api_key_env=LANE_API_KEY: build_app raises without the variable, and the app is built (and its Ingress
    replicas run) on any node, so every container reads it from the Secret that secret.yaml defines."""
    doc = _load("kuberay/rayservice.yaml")
    sets = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["set"]
    (env_name,) = [s.split("=", 1)[1] for s in sets if s.startswith("serve.api_key_env=")]
    secret = _load("kuberay/secret.yaml")
    assert secret["kind"] == "Secret" and secret["apiVersion"] == "v1"
    spec = _cluster_spec(doc)
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        for c in pod["template"]["spec"]["containers"]:
            (var,) = [e for e in c.get("env", []) if e["name"] == env_name]
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"])
def test_every_claimed_volume_is_defined_and_shared(name):
    pvc = _load("kuberay/pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    spec = _cluster_spec(_load(name))
    for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["template"]["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]]


def test_image_pins_ray_to_the_manifests_version_and_has_the_probe_tools():
    text = (CLUSTER / "Dockerfile").read_text()
    version = _cluster_spec(_load("kuberay/rayservice.yaml"))["rayVersion"]
    assert f"ARG RAY_VERSION={version}" in text and "ray[data,train,serve,default]==${RAY_VERSION}" in text
    apt = next(line for line in text.splitlines() if "apt-get install" in line)
    assert " wget" in apt  # KubeRay's probes call wget
    assert "docker build -f cluster/Dockerfile -t REGISTRY/lane-ray:0.1.0 ." in text and "docker push" in text
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        spec = _cluster_spec(_load(f"kuberay/{name}"))
        for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            assert all(c["image"] == "lane-ray:0.1.0" for c in pod["template"]["spec"]["containers"])


def test_launcher_leaves_environments_and_runs_behind_and_pins_ray():
    doc = _load("lane-cluster.yaml")
    for what in (".venv", "runs", ".git"):
        assert f"**/{what}" in doc["rsync_exclude"]
    assert ".gitignore" in doc["rsync_filter"]
    assert any("ray[data,train,serve,default]==" + importlib.import_module("ray").__version__ in c
               for c in doc["setup_commands"])
