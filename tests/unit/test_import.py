"""Importing the package must stay cheap: no ray, torch, vllm or sentence-transformers."""

import json
import subprocess
import sys

HEAVY = ["ray", "torch", "vllm", "sentence_transformers", "transformers"]


def test_import_loads_no_heavy_dependency():
    code = (
        "import sys, json, lane_ray, lane_ray.config, lane_ray.data, lane_ray.cli, lane_ray.io, "
        "lane_ray.progress, lane_ray.data.synth, jobs.pipeline;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_cli_help_is_fast_and_lists_design_commands():
    out = subprocess.run([sys.executable, "-m", "lane_ray.cli", "--help"], capture_output=True, text=True,
                         check=True)
    for cmd in ["run", "data", "embed", "preferences", "train", "evaluate", "explain", "serve", "submit",
                "report"]:
        assert cmd in out.stdout
