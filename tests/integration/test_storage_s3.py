"""A run directory on S3: a real S3 protocol server (moto's, on 127.0.0.1), pyarrow's S3 filesystem, the session's
Ray cluster. Ray Data workers write the embedding parts straight into the bucket; a second machine (a fresh staging
folder) resumes from what the bucket holds."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from lane_ray.cli import main

moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev extra) provides the local S3 server")


@pytest.fixture(scope="module")
def s3_uri():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    fs = pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"{host}:{port}", scheme="http",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("lane-runs")
    # credentials in the URI: Ray workers started before this test do not see environment variables set now
    yield f"s3://test:test@lane-runs/run-1?endpoint_override={host}:{port}&scheme=http&region=us-east-1", fs
    server.stop()


def remote_files(fs, prefix="lane-runs/run-1"):
    sel = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return {i.path[len(prefix) + 1:]: i.size for i in fs.get_file_info(sel) if i.type == pafs.FileType.File}


def test_prepare_and_embed_into_s3_then_resume_elsewhere(ray_cluster, s3_uri, ml100k_dir, tmp_path, capsys,
                                                         monkeypatch):
    uri, fs = s3_uri
    monkeypatch.setenv("LANE_STAGE_DIR", str(tmp_path / "machine-a"))
    assert main(["data", "prepare", str(ml100k_dir), "--out", uri, "-q"]) == 0
    assert main(["embed", "--out", uri, "--set", "embed.device=cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "4 embeddings" in out and "4 new" in out
    files = remote_files(fs)
    parts = [f for f in files if f.startswith("item_embeddings.parquet/part-")]
    assert parts and "item_embeddings.parquet/_manifest.json" in files and "data/catalog.parquet" in files
    assert not [f for f in files if f.endswith(".tmp")]  # every object arrived whole
    rows = 0
    for p in parts:
        with fs.open_input_file(f"lane-runs/run-1/{p}") as fh:
            rows += pq.read_metadata(fh).num_rows
    assert rows == 4
    timings = json.loads(fs.open_input_stream("lane-runs/run-1/timings.json").read())
    assert {"data", "embed_catalog"} <= set(timings)
    # machine B: nothing local; everything it needs comes from the bucket and nothing is embedded again
    monkeypatch.setenv("LANE_STAGE_DIR", str(tmp_path / "machine-b"))
    assert main(["embed", "--out", uri, "--set", "embed.device=cpu"]) == 0
    cap = capsys.readouterr()
    assert "0 new, 4 reused" in cap.out and "files pulled" in cap.err
    after = remote_files(fs)
    # the same parts (nothing re-embedded, nothing removed); the manifest now describes this (no-op) invocation
    assert {f: n for f, n in after.items() if "/part-" in f} == {f: n for f, n in files.items() if "/part-" in f}
    assert set(after) == set(files)
