"""ml-100k, the embedded default, end to end through the installed `lane` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lane_ray.data import LeaveOneOutSplit, read_prepared

LANE = [sys.executable, "-m", "lane_ray.cli"]


def lane(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LANE, *args], capture_output=True, text=True, timeout=300)


def test_stats_match_the_published_sizes():
    out = lane("data", "stats", "ml-100k", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["seq_len"]["min"] == 20 and stats["seq_len"]["max"] == 737


def test_prepare_then_split_without_leakage(tmp_path):
    out = lane("data", "prepare", "ml-100k", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    p = read_prepared(tmp_path)
    assert p.interactions.num_rows == 100000 and p.catalog.num_rows == 1682
    titles = dict(zip(p.catalog["item_id"].to_pylist(), p.catalog["title"].to_pylist(), strict=True))
    assert titles[1] == "Toy Story" and titles[12] == "The Usual Suspects"
    split = LeaveOneOutSplit.from_interactions(p.interactions)
    assert split.num_users == 943
    assert int(split.train_lengths().sum()) == 100000 - 2 * 943


def test_installed_entry_point_and_job_module(ray_cluster, tmp_path):
    exe = Path(sys.executable).parent / "lane"
    if not exe.exists():
        pytest.skip("the lane console script is not installed next to this interpreter")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}  # the session's cluster, not a second one
    # the LLM stage on a few users only: all 943 take ~35 minutes on 2 AVX2 cores (README)
    # and no explanation stage (one explanation takes ~30 s here; test_run runs it inside `lane run`,
    # test_explain at length)
    cap = ["--set", "preferences.max_users=4", "--set", "preferences.m=3", "--set", "train.epochs=1",
           "--set", "run.explain_users=0"]
    out = subprocess.run([str(exe), "run", "--out", str(tmp_path), *cap], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "catalog.parquet").exists() and (tmp_path / "config.yaml").exists()
    assert json.loads((tmp_path / "item_embeddings.parquet" / "_manifest.json").read_text())["rows"] == 1682
    prefs = json.loads((tmp_path / "preferences.parquet" / "_manifest.json").read_text())
    assert (prefs["users"], prefs["m"]) == (4, 3) and sum(prefs["status"].values()) == 4
    assert json.loads((tmp_path / "preference_embeddings.parquet" / "_manifest.json").read_text())["rows"] == 12
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for variant in ("id", "lane"):  # all 943 users evaluated; users without preferences pass the alignment through
        assert metrics[f"sasrec/{variant}/seed0"]["epochs"] == 1
        assert 0 < metrics[f"sasrec/{variant}/seed0"]["sampled100"]["hr@20"] <= 1
    assert metrics["faithfulness"]["sasrec/lane/seed0"]["users"] == 4  # only users with preferences count
    assert (tmp_path / "checkpoints" / "lane" / "model.safetensors").exists()
    assert pq.read_metadata(tmp_path / "candidates.parquet").num_rows == 943 * 10
    job = subprocess.run([sys.executable, "jobs/pipeline.py", "--out", str(tmp_path), *cap], capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).resolve().parents[2], env=env)
    assert job.returncode == 0 and "skipped (output is current)" in job.stderr
    assert "0 to embed" in job.stderr and "4 cached, 0 to extract" in job.stderr  # every stage is current
    assert "train_sasrec_lane: skipped" in job.stderr
