"""Run directories on pyarrow filesystems: staging, incremental push/pull, mirrored removals, atomic uploads. The
remote here is a ``file://`` URI (pyarrow's LocalFileSystem through the same code path as s3:// and gs://);
tests/integration/test_storage_s3.py runs the same against a real S3 server."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from lane_ray import storage
from lane_ray.cli import main
from lane_ray.errors import DataError
from lane_ray.pipeline.sink import write_part_uri
from lane_ray.progress import NewEntries
from lane_ray.storage import RunStorage, is_uri, open_run, remote_dir


@pytest.fixture
def remote(tmp_path):
    root = tmp_path / "bucket" / "run"
    return root, f"file://{root}"


@pytest.fixture(autouse=True)
def no_active_storage():
    yield
    storage._ACTIVE.clear()


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_is_uri():
    assert is_uri("s3://b/p") and is_uri("gs://b/p") and is_uri("file:///x")
    assert not is_uri("runs/default") and not is_uri("/abs/path") and not is_uri(None)


def test_push_uploads_changes_only_and_mirrors_own_removals(tmp_path, remote):
    root, uri = remote
    local = tmp_path / "stage"
    (local / "data").mkdir(parents=True)
    (local / "data" / "a.parquet").write_bytes(b"A" * 10)
    (local / "metrics.json").write_text("{}")
    (local / ".x.parquet.abc.tmp").write_bytes(b"unfinished")  # a write in flight never travels
    s = RunStorage(uri, local)
    assert s.push() == {"uploaded": 2, "removed": 0}
    assert files(root) == ["data/a.parquet", "metrics.json"]
    assert s.push() == {"uploaded": 0, "removed": 0}  # nothing changed
    (local / "metrics.json").write_text('{"x": 1}')
    (local / "data" / "a.parquet").unlink()  # e.g. compacted away
    (root / "ray_train").mkdir()
    (root / "ray_train" / "ckpt").write_text("Ray Train's own")  # never ours to touch
    (root / "data" / "worker-part.parquet").write_text("written by a worker, not pulled yet")
    assert s.push() == {"uploaded": 1, "removed": 1}
    assert files(root) == ["data/worker-part.parquet", "metrics.json", "ray_train/ckpt"]
    assert json.loads((root / "metrics.json").read_text()) == {"x": 1}
    assert not [p for p in root.rglob("*.tmp")]  # uploads went through a temporary name and were moved


def test_pull_resumes_elsewhere_and_follows_remote_removals(tmp_path, remote):
    root, uri = remote
    (root / "data").mkdir(parents=True)
    (root / "data" / "p1.parquet").write_bytes(b"1" * 5)
    (root / "timings.json").write_text("{}")
    (root / "ray_train" / "x").mkdir(parents=True)
    (root / "ray_train" / "x" / "big.pt").write_bytes(b"0" * 100)
    s = RunStorage(uri, tmp_path / "stage")
    assert s.pull() == 2  # Ray Train's checkpoints stay remote
    assert files(tmp_path / "stage") == [".lane_sync.json", "data/p1.parquet", "timings.json"]
    assert RunStorage(uri, tmp_path / "stage").pull() == 0  # a new process: the sync state says nothing changed
    (root / "data" / "p1.parquet").unlink()
    (root / "data" / "p2.parquet").write_bytes(b"2" * 5)
    assert s.pull("data") == 1
    assert files(tmp_path / "stage" / "data") == ["p2.parquet"]


def test_worker_parts_go_to_the_remote_folder_of_a_staged_run(tmp_path, remote):
    root, uri = remote
    local = open_run(uri, str(tmp_path / "stage"))
    assert local == str(tmp_path / "stage")
    out = tmp_path / "stage" / "item_embeddings.parquet"
    assert remote_dir(out) == f"{uri}/item_embeddings.parquet"
    assert remote_dir(tmp_path / "elsewhere") is None
    progress = NewEntries(out)  # the progress view counts what workers wrote into the bucket
    written = write_part_uri(remote_dir(out), pa.table({"item_id": [1, 2]}))
    assert written.startswith(f"{uri}/item_embeddings.parquet/part-")
    assert progress() == 2
    storage.pull_dir(out)
    assert [p.name.startswith("part-") for p in out.iterdir()] == [True]


def test_a_bad_uri_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot open this storage URI"):
        RunStorage("nosuchscheme://bucket/run", tmp_path)


def test_lane_commands_on_a_file_uri_run_directory(tmp_path, remote, ml100k_dir, capsys, monkeypatch):
    root, uri = remote
    monkeypatch.setenv("LANE_STAGE_DIR", str(tmp_path / "stages"))
    assert main(["data", "prepare", str(ml100k_dir), "--out", uri, "-q"]) == 0
    assert {"data/catalog.parquet", "data/interactions.parquet", "data/prepare.json"} <= set(files(root))
    assert "timings.json" in files(root)
    # another machine (a fresh staging folder) resumes from the remote: the data stage is current there
    monkeypatch.setenv("LANE_STAGE_DIR", str(tmp_path / "other-machine"))
    assert main(["data", "prepare", str(ml100k_dir), "--out", uri]) == 0
    err = capsys.readouterr().err
    assert "files pulled" in err
    assert main(["report", uri]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    assert "report/report.md" in files(root)
    assert main(["status", uri]) == 2  # no `lane run` here: no progress file, said plainly
    assert "no progress file" in capsys.readouterr().err
    assert os.path.isdir(tmp_path / "other-machine")
