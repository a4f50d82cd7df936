from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from lane_ray.cli import main
from tests.conftest import write


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_stats_json(capsys, ml100k_dir):
    rc, out, _ = run(capsys, "data", "stats", str(ml100k_dir), "--json")
    assert rc == 0
    stats = json.loads(out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 4, 10)
    assert stats["seq_len"] == {"min": 3, "max": 4, "mean": 3.333, "median": 3.0, "p90": 3.8}


def test_prepare_writes_canonical_tables(capsys, ml100k_dir, run_dir):
    rc, _, err = run(capsys, "data", "prepare", str(ml100k_dir), "--format", "movielens", "--out", str(run_dir))
    assert rc == 0 and "data: done" in err
    inter = pq.read_table(run_dir / "data" / "interactions.parquet")
    assert inter.column_names == ["user_id", "item_id", "timestamp", "rating"]
    # user 3's items 4 and 2 share a timestamp; file order decides
    assert inter.filter(inter["user_id"].to_numpy() == 3)["item_id"].to_pylist() == [4, 2, 1]
    meta = json.loads((run_dir / "data" / "prepare.json").read_text())
    assert meta["stats"]["interactions"] == 10 and meta["fingerprint"]
    timings = json.loads((run_dir / "timings.json").read_text())
    assert timings["data"]["rows"] == 10 and timings["data"]["peak_rss_mb"] > 0


def test_synth(capsys, run_dir):
    rc, out, _ = run(capsys, "data", "synth", "--items", "500", "--users", "50", "--out", str(run_dir), "-q")
    assert rc == 0 and "50 users, 500 items" in out
    assert pq.read_metadata(run_dir / "data" / "catalog.parquet").num_rows == 500


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["data", "stats", "no-such-set"], "unknown dataset 'no-such-set'"),
        (["data", "stats", "ml-100k", "--set", "data.user_k_core=x"], "config field 'data.user_k_core'"),
        (["data", "synth", "--items", "0", "--out", "x"], "config field 'synth.items'"),
        (["submit", "--address", "http://127.0.0.1:1"], "give the lane command after --"),
        (["submit", "--address", "http://127.0.0.1:1", "--", "serve"], "is not a batch job"),
        (["submit", "--address", "http://127.0.0.1:1", "--", "run"], "cannot reach the job server"),
        (["serve", "--run", "no/such/run"], "no checkpoints in this run directory"),
        (["index", "--run", "no/such/run", "--checkpoint", "x"], "no checkpoint 'x' (have: none"),
        (["serve", "--run", "no/such/run", "--port", "0"], "config field 'serve.port'"),
        (["train", "--set", "train.lr=-1"], "config field 'train.lr'"),
        (["train", "--set", "train.variant=bogus"], "config field 'train.variant'"),
        (["evaluate", "--out", "no/such/run"], "no checkpoints; run `lane train"),
        (["data", "prepare", "ml-100k"], "--out DIR is required"),
    ],
)
def test_errors_are_one_line_with_exit_2(capsys, argv, expect):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("lane: error:")]
    assert len(lines) == 1 and expect in lines[0]
    assert "Traceback" not in err


def test_submit_without_an_address_names_both_ways_to_give_one(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc, _, err = run(capsys, "submit", "--", "run")
    assert rc == 2 and "give --address http://HEAD:8265 or set RAY_ADDRESS" in err
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    rc, _, err = run(capsys, "submit", "--", "run")
    assert rc == 2 and "cannot reach the job server at http://127.0.0.1:1" in err


def test_malformed_file_through_cli(capsys, tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp,title\n1,1,1,A\n1,oops,2,B\n")
    rc, _, err = run(capsys, "data", "stats", str(tmp_path / "interactions.csv"), "--format", "csv")
    assert rc == 2
    assert "interactions.csv: row 3: field 'item_id': not an integer: 'oops'" in err


def test_config_file_is_used(capsys, tmp_path, ml100k_dir):
    cfgf = write(tmp_path / "c.yaml", f"data:\n  dataset: {ml100k_dir}\n  max_users: 1\n")
    rc, out, _ = run(capsys, "data", "stats", str(ml100k_dir), "--config", str(cfgf), "--json")
    assert rc == 0 and json.loads(out)["users"] == 1
