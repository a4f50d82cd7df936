"""serve/config*.yaml load as Ray Serve deploy configs and point at code that exists; build_app's arguments and
errors; the scaling and GPU choices."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("ray.serve")


@pytest.mark.parametrize("name", ["config.yaml", "config_gpu.yaml"])
def test_serve_configs_validate_and_name_our_deployments(name):
    from ray.serve.schema import ServeDeploySchema

    doc = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / name).read_text()))
    lane = next(a for a in doc.applications if a.import_path == "serve.app:build_app")
    assert lane.route_prefix == "/" and set(lane.args) <= {"run_dir", "config", "set"}
    assert {d.name for d in lane.deployments} <= {"Ingress", "Ranker", "PreferenceExtractor", "Explainer"}
    assert doc.http_options.host == "127.0.0.1"
    for app in doc.applications:
        module, attr = app.import_path.split(":")
        if module.startswith("ray.serve.llm"):
            continue  # needs vLLM (the gpu extra); checked by name only
        assert callable(getattr(importlib.import_module(module), attr))


def test_build_app_from_the_yaml_args(serving_run):
    from ray.serve.deployment import Application

    from serve.app import build_app

    args = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]["args"]
    app = build_app({**args, "run_dir": str(serving_run)})
    assert isinstance(app, Application)


@pytest.mark.parametrize("args, match", [
    ({}, "run_dir is required"),
    ({"run_dir": "no/such/dir"}, "run directory not found"),
    ({"run_dir": ".", "bogus": 1}, "unknown argument"),
    ({"run_dir": ".", "set": ["serve.max_k=0"]}, "config field 'serve.max_k'"),
    ({"run_dir": ".", "set": "serve.api_key_env=LANE_NO_SUCH_KEY_VAR"}, "LANE_NO_SUCH_KEY_VAR, which is not set"),
])
def test_build_app_errors_are_one_line(args, match):
    from lane_ray.errors import LaneError
    from serve.app import build_app

    with pytest.raises(LaneError, match=match):
        build_app(args)


def test_scaling_and_gpu_choices():
    from serve.app import explainer_gpus, replica_scaling

    assert replica_scaling(2, None, 8) == {"num_replicas": 2}
    assert replica_scaling(2, 2, 8) == {"num_replicas": 2}
    assert replica_scaling(1, 4, 5) == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                        "target_ongoing_requests": 5}}
    assert explainer_gpus(0.5, "transformers") == 0.5
    assert explainer_gpus(None, "openai") == 0.0
