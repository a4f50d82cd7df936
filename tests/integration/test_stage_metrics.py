"""Pipeline stages as Ray metrics (lane_ray/stage_metrics.py): the session's `lane run` (its driver is this test
process, which goes on living; the metrics are held by a detached actor so that a job's driver may exit) leaves
every finished stage's seconds and rows on the cluster's Prometheus endpoint, tagged with the stage and the run."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_serve import scrape

pytestmark = pytest.mark.integration


def test_finished_stages_are_on_rays_prometheus_endpoint(pipeline_run):
    import ray

    assert pipeline_run.rc == 0, pipeline_run.stderr[-3000:]
    run = f'run="{pipeline_run.out.name}"'
    timings = json.loads((pipeline_run.out / "timings.json").read_text())
    # a test may redo stages in this run directory, which adds to the counters: at least this run's own figures
    seconds = scrape(rf'^ray_lane_stage_seconds_total\{{(?=.*{run})(?=.*stage="train_sasrec_lane")')
    assert sum(seconds.values()) >= timings["train_sasrec_lane"]["seconds"] - 1e-3 > 0, seconds
    assert sum(scrape(rf'^ray_lane_stage_runs_total\{{(?=.*{run})(?=.*stage="train_sasrec_lane")').values()) >= 1
    # the data stage finishes before the driver joins Ray: held, then sent
    rows = scrape(rf'^ray_lane_stage_rows_total\{{(?=.*{run})(?=.*stage="data")')
    assert sum(rows.values()) >= timings["data"]["rows"] > 0, rows
    assert ray.get_actor("lane_stage_metrics", namespace="lane")  # the holder outlives any one driver
