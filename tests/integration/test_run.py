"""`lane run` on a shared local Ray cluster: stages are skipped when their output is current."""

from __future__ import annotations

import json

from lane_ray.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_skips_current_stage_and_redoes_on_change(pipeline_run, capsys):
    first, run_dir = pipeline_run, pipeline_run.out
    assert first.rc == 0, first.stderr[-4000:]
    assert "[1/10] data: started" in first.stderr and "[9/10] explain: done" in first.stderr
    doc = json.loads((run_dir / "progress.json").read_text())
    assert doc["state"] == "done" and [s["state"] for s in doc["stages"]] == ["done"] * 10
    assert (run_dir / "explanations.parquet").exists()
    args = [*first.args(), "--out", str(run_dir)]
    rc, out, err = run(capsys, *args)
    assert rc == 0 and "skipped (output is current)" in err
    doc = json.loads((run_dir / "progress.json").read_text())
    assert [s["state"] for s in doc["stages"]] == ["skipped"] * 9 + ["done"]  # only the report is rewritten
    assert out.split() == [str(run_dir), str(run_dir / "report" / "report.md")]
    report = (run_dir / "report" / "report.md").read_text()
    assert "sasrec | lane" in report and (run_dir / "report" / "attention.png").exists()
    # a data change redoes every stage after it (the explanation stage is left out: the first run covered it)
    rc, _, err = run(capsys, *args, "--set", "data.max_users=2", "--set", "run.explain_users=0")
    assert rc == 0 and "data: done" in err and "train_sasrec_lane: done" in err and "explain" not in err
    assert json.loads((run_dir / "data" / "prepare.json").read_text())["stats"]["users"] == 2
    assert (run_dir / "item_embeddings.parquet" / "_manifest.json").exists()
    timings = json.loads((run_dir / "timings.json").read_text())
    assert {"data", "embed_catalog", "train_sasrec_id", "train_sasrec_lane", "explain", "report"} <= set(timings)
    assert all(t["peak_tree_rss_mb"] >= t["peak_rss_mb"] for t in timings.values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["sasrec/id/seed0"]["epochs"] == 2 and metrics["sasrec/lane/seed0"]["epochs"] == 2
    assert "faithfulness" in metrics
