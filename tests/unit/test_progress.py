"""The one progress view of a run: stage positions, in-stage progress from the parts a stage writes, progress.json
and `lane status` (no Ray: stages here are plain code writing part files)."""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pytest

from lane_ray.cli import main
from lane_ray.pipeline.sink import write_part
from lane_ray.progress import NewEntries, RunProgress, Stage, expect, format_progress


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch):
    monkeypatch.setenv("LANE_PROGRESS_INTERVAL", "0.05")


def parts(folder, n, rows=5):
    for _ in range(n):
        write_part(folder, pa.table({"x": list(range(rows))}))


def test_new_entries_counts_rows_of_new_parts_only(tmp_path):
    parts(tmp_path, 2)  # written before: reused rows are not progress
    count = NewEntries(tmp_path)
    assert count() == 0
    parts(tmp_path, 3, rows=4)
    (tmp_path / ".part-unfinished.parquet.tmp").write_bytes(b"partial")  # a write in flight is not counted
    assert count() == 12


def test_run_progress_numbers_stages_reports_work_and_records_states(tmp_path, capsys):
    out = tmp_path / "emb"
    out.mkdir()
    with RunProgress(tmp_path, ["data", "embed", "train", "report"]) as run:
        with Stage("data", tmp_path) as st:
            st.skipped = True
        with Stage("embed", tmp_path) as st:
            expect(20, NewEntries(out), "texts")

            def writer():
                for _ in range(4):
                    parts(out, 1)
                    time.sleep(0.06)

            t = threading.Thread(target=writer)
            t.start()
            t.join()
            time.sleep(0.2)
            st.rows = 20
            mid = json.loads((tmp_path / "progress.json").read_text())
        with pytest.raises(RuntimeError), Stage("train", tmp_path):
            raise RuntimeError("worker died")
        assert run.state == "running"
    err = capsys.readouterr().err
    assert "[1/4] data: skipped (output is current)" in err
    assert "[2/4] embed: started" in err
    assert "[2/4] embed: 20/20 texts (100.0%)" in err  # the ticker saw every part land
    assert "[3/4] train: failed after" in err and "(run 0m0" in err
    doc = json.loads((tmp_path / "progress.json").read_text())
    assert doc["state"] == "done"
    states = {s["name"]: s for s in doc["stages"]}
    assert [s["name"] for s in doc["stages"]] == ["data", "embed", "train", "report"]
    assert states["data"]["state"] == "skipped"
    assert states["embed"]["state"] == "done" and states["embed"]["done"] == 20 and states["embed"]["rows"] == 20
    assert states["train"]["state"] == "failed" and states["train"]["error"] == "worker died"
    assert states["report"]["state"] == "pending"
    assert next(s for s in mid["stages"] if s["name"] == "embed")["state"] == "running"
    text = format_progress(doc)
    assert "embed" in text and "20/20 texts (100%)" in text and "failed" in text and ": worker died" in text
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings) == {"embed"}  # skipped and failed stages keep no timing
    assert timings["embed"]["peak_tree_rss_mb"] >= timings["embed"]["peak_rss_mb"] > 0


def test_first_line_says_what_a_stage_will_do_and_roughly_how_long(tmp_path, monkeypatch, capsys):
    from lane_ray.progress import DEFAULT_RATES, estimate, rates_path

    monkeypatch.setenv("LANE_CACHE_DIR", str(tmp_path / "cache"))
    key = "preferences/transformers/cpu"
    total = 600
    first = estimate(key, total, "users")
    seconds = int(total / DEFAULT_RATES[key])
    assert "2-core CPU" in first and f"roughly {seconds // 60}m{seconds % 60:02d}s" in first
    assert estimate("embed/other", 10, "texts") is None
    out = tmp_path / "parts"
    out.mkdir()
    with Stage("preferences", tmp_path):
        expect(4, NewEntries(out), "users", rate_key=key)
        parts(out, 1, rows=4)
        time.sleep(1.1)  # a pace is kept only after a second of work
    err = capsys.readouterr().err
    assert "preferences: 4 users to do, roughly" in err
    kept = json.loads(rates_path().read_text())[key]
    assert 0 < kept <= 4 / 1.1
    assert "this machine's last run" in estimate(key, 100, "users")
    # training's bound: the epochs are a limit, not a promise
    with Stage("train", tmp_path):
        expect(200, lambda: 0, "epochs", bound=lambda: None, rate_key="epochs/x")
    assert "at most 200 epochs to do, no earlier pace to estimate from yet" in capsys.readouterr().err


def test_expect_outside_a_stage_is_a_no_op(tmp_path):
    expect(10, NewEntries(tmp_path), "rows")  # nothing to report into; must not raise or start threads
    assert threading.active_count() >= 1


def test_an_interrupted_run_says_so(tmp_path):
    with pytest.raises(KeyboardInterrupt), RunProgress(tmp_path, ["a"]), Stage("a", tmp_path, quiet=True):
        raise KeyboardInterrupt
    doc = json.loads((tmp_path / "progress.json").read_text())
    assert doc["state"] == "interrupted" and doc["stages"][0]["state"] == "interrupted"


def test_lane_status_prints_the_view_and_refuses_what_is_not_a_run(tmp_path, capsys):
    with RunProgress(tmp_path, ["data", "report"]), Stage("data", tmp_path, quiet=True) as st:
        st.rows = 3
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{tmp_path}: done, elapsed")
    assert "1. data" in out and "done" in out and "2. report" in out and "pending" in out
    assert main(["status", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["rows"] == 3
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "no progress file" in capsys.readouterr().err
    (tmp_path / "progress.json").write_text("{not json")
    assert main(["status", str(tmp_path)]) == 2
    assert "not a progress file" in capsys.readouterr().err


def test_pace_runs_the_eta_to_an_early_stopping_limit():
    from lane_ray.progress import pace

    assert pace(0, 200, 65, "epochs") == "0/200 epochs (0.0%), none finished after 1m05s"
    # 10 epochs in 100 s: 190 more would take 31m40s, but the run stops after epoch 15 at the latest
    assert pace(10, 200, 100, "epochs") == "10/200 epochs (5.0%), 6.0 epochs/min, ETA 31m40s"
    line = pace(10, 200, 100, "epochs", (15, "early stopping"))
    assert line == "10/200 epochs (5.0%), 6.0 epochs/min, ETA at most 0m50s (early stopping)"
    assert pace(200, 200, 100, "epochs", (15, "x")) == "200/200 epochs (100.0%), 2.0 epochs/s"  # done: no ETA
    assert "ETA 31m40s" in pace(10, 200, 100, "epochs", (200, "x"))  # a limit at the total changes nothing


def test_epoch_progress_reads_the_newest_checkpoint_and_its_early_stopping_limit(tmp_path):
    from lane_ray.pipeline.train import EpochProgress

    def checkpoint(name: str, done: int, best: int) -> None:
        for sub, meta in (("model", {"epochs_done": done}), ("best", {"epoch": best})):
            (tmp_path / name / sub).mkdir(parents=True)
            (tmp_path / name / sub / "config.json").write_text(json.dumps({"meta": meta}))

    epochs = EpochProgress(tmp_path, patience=10, epochs=200)
    assert epochs() == 0 and epochs.bound() is None and epochs.base == 0  # no checkpoint yet
    # Ray Train keeps the newest two: epochs 1-5 came and went, the counter still says 7
    checkpoint("checkpoint_2026-12-03_10-00-00.000001", 6, 4)
    checkpoint("checkpoint_2026-12-03_10-00-09.000001", 7, 4)
    (tmp_path / "checkpoint_2026-12-03_10-00-19.000001").mkdir()  # newest, still being written: skipped
    assert epochs() == 7
    limit, why = epochs.bound()
    assert limit == 15 and "epoch 5" in why and "after epoch 15" in why  # best 0-based epoch 4, then 10 more
    assert EpochProgress(tmp_path, patience=10, epochs=12).bound()[0] == 12 - 7  # capped; a resumed run's base
    assert EpochProgress(tmp_path / "missing", 10, 200)() == 0
