"""`lane report`: every section built from a run's artifacts (numbers copied, PNGs that open), and a run
without some artifacts says which command makes them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from lane_ray.io import write_parquet

pytest.importorskip("matplotlib")


def _metrics(ndcg: float) -> dict:
    block = {m: ndcg for m in ("ndcg@10", "hr@10", "mrr@10")}
    return {"full": dict(block), "sampled100": {k: v * 5 for k, v in block.items()}, "epochs": 3}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "curves").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "sasrec/id/seed0": _metrics(0.0812), "sasrec/lane/seed0": _metrics(0.0934),
        "faithfulness": {"sasrec/lane/seed0": {"users": 9, "top_hurts_more": 0.6667}}}))
    (run / "timings.json").write_text(json.dumps({
        "embed_catalog": {"seconds": 12.5, "peak_rss_mb": 812.0, "peak_tree_rss_mb": 2048.0, "rows": 1682,
                          "titles_per_s": 134.6},
        "train sasrec/lane/seed0": {"seconds": 40.25, "peak_rss_mb": 900.0, "rows": None}}))
    (run / "curves" / "sasrec-lane-seed0.json").write_text(json.dumps({
        "name": "sasrec-lane-seed0", "epochs": 2, "best_epoch": 1, "seconds_per_epoch": 1.75,
        "best_valid": {"full": {"ndcg@10": 0.0777}},
        "curve": [{"epoch": e, "loss": 7 - e, "valid": {"full": {"ndcg@10": 0.05 + e / 100}}} for e in range(2)]}))
    write_parquet(run / "candidates.parquet", pa.table({
        "user_id": pa.array([1, 1, 2], pa.int64()), "item_id": pa.array([10, 11, 12], pa.int64()),
        "rank": pa.array([1, 2, 1], pa.int64()), "score": pa.array([3.0, 2.0, 1.0]),
        "preference_weights": pa.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.15, 0.75]],
                                       pa.list_(pa.float32()))}))
    write_parquet(run / "preferences.parquet", pa.table({
        "user_id": pa.array([1, 2], pa.int64()),
        "preferences": [["tense thrillers", "comedies", "westerns"], ["dramas", "musicals", "space operas"]]}))
    write_parquet(run / "explanations.parquet", pa.table({
        "user_id": pa.array([1], pa.int64()), "item_id": pa.array([10], pa.int64()),
        "reason": ["Because you love tense thrillers."]}))
    (run / "explanation_checks.json").write_text(json.dumps({
        "rows": 2, "users": 2, "mode": "grounded", "source": {"llm": 1, "template": 1}, "format_ok": 1,
        "cites_history": 0, "rates": {"follows_attribution": 0.5, "cites_main": None},
        "chance": {"follows_attribution": 0.16, "cites_main": 0.2},
        "passed": {"follows_attribution": 1, "cites_main": 0}, "measured": {"follows_attribution": 2,
                                                                          "cites_main": 0}}))
    return run


def test_report_numbers_come_from_the_artifacts_and_plots_open(run, capsys):
    import matplotlib.image as mpimg

    from lane_ray.cli import main

    assert main(["report", str(run)]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == run / "report" / "report.md"
    text = path.read_text()
    for needle in ("0.0812", "0.0934", "0.4670", "0.667", "sasrec-lane-seed0 | 2 | 1 | 0.0777 | 1.75",
                   "embed_catalog | 12.50 | 812 | 2048 | 1682 | titles_per_s 134.6",
                   "| 1 | 10 | tense thrillers (0.70) | Because you love tense thrillers. |",
                   "| 2 | 12 | space operas (0.75) | _not explained", "follows_attribution | 0.500 | 0.160 | 1 / 2",
                   "source: llm 1, template 1"):
        assert needle in text, needle
    for png in ("ablation.png", "curves.png", "timings.png", "attention.png"):
        assert f"({png})" in text
        img = mpimg.imread(run / "report" / png)
        assert img.shape[0] > 100 and img.shape[1] > 100


def test_missing_artifacts_name_the_command(tmp_path, capsys):
    from lane_ray.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    for cmd in ("lane run / lane experiment ablation", "lane train / lane run", "lane explain"):
        assert cmd in text
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err
