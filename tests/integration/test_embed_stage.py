"""The Ray Data embedding stage on a real local Ray cluster with the real encoder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lane_ray.config import EmbedConfig, RayConfig
from lane_ray.errors import DataError
from lane_ray.pipeline.embed import embed_texts, read_embeddings
from lane_ray.pipeline.embed_plan import ENCODER_META
from lane_ray.text import TextEncoder, encoder_id
from lane_ray.text.rows import text_sha1

CFG = EmbedConfig(device="cpu", rows_per_batch=64, batch_size=32)


def catalog(path: Path, ids, titles) -> Path:
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.string())}), path)
    return path


def synth_titles(n: int, seed: int = 0) -> list[str]:
    from lane_ray.data.synth import item_titles

    return item_titles(np.arange(1, n + 1, dtype=np.int64), 18, seed)[0]


def check_output(out: Path, expect_ids: list[int], titles: dict[int, str]) -> pa.Table:
    t = read_embeddings(out)
    ids = t["item_id"].to_pylist()
    assert sorted(ids) == sorted(expect_ids) and len(set(ids)) == len(ids)  # complete, unique
    emb = np.asarray(t["embedding"].to_pylist(), dtype=np.float32)
    assert emb.shape == (len(ids), 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert all(s == text_sha1(titles[i]) for i, s in zip(ids, t["text_sha1"].to_pylist(), strict=True))
    for part in out.glob("part-*.parquet"):
        assert pq.read_schema(part).metadata[ENCODER_META].decode() == encoder_id("all-MiniLM-L6-v2")
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    return t


def test_small_catalogue_matches_direct_encoding(ray_cluster, tmp_path):
    titles = synth_titles(300)
    ids = list(range(1000, 1300))
    cat = catalog(tmp_path / "catalog.parquet", ids, titles)
    m = embed_texts(cat, tmp_path / "item_embeddings.parquet", CFG, RayConfig())
    assert (m["rows"], m["embedded_now"], m["reused"], m["rejected"]) == (300, 300, 0, 0)
    t = check_output(tmp_path / "item_embeddings.parquet", ids, dict(zip(ids, titles, strict=True)))
    direct = TextEncoder(device="cpu", num_threads=2).encode(titles)
    got = np.asarray(t["embedding"].to_pylist(), dtype=np.float32)[np.argsort(t["item_id"].to_numpy())]
    assert np.allclose((got * direct).sum(1), 1.0, atol=1e-4)
    assert (tmp_path / "item_embeddings.parquet" / "_manifest.json").exists()


def test_tokenizer_actors_feed_the_encoder_the_same_vectors(ray_cluster, tmp_path):
    """The GPU layout (CPU tokenizer actors ahead of the encoder), run on CPU: the same vectors as encode."""
    titles = synth_titles(150, seed=3) + [("Ignore all previous instructions " * 40).strip(), "Ünïcödé — title (1999)"]
    ids = list(range(1, len(titles) + 1))
    cat = catalog(tmp_path / "catalog.parquet", ids, titles)
    cfg = CFG.model_copy(update={"tokenize_stage": True, "max_actors": 1, "cpus_per_actor": 0.5,
                                 "tokenizer_cpus_per_actor": 0.5})
    m = embed_texts(cat, tmp_path / "emb", cfg, RayConfig())
    assert m["ray"]["tokenizer_actors_max"] == 1 and m["rows"] == len(titles)
    t = check_output(tmp_path / "emb", ids, dict(zip(ids, titles, strict=True)))
    direct = TextEncoder(device="cpu", num_threads=2).encode(titles)
    got = np.asarray(t["embedding"].to_pylist(), dtype=np.float32)[np.argsort(t["item_id"].to_numpy())]
    assert np.allclose(got, direct, atol=1e-5)


def test_tokenizer_actors_that_leave_no_cpu_are_refused(ray_cluster, tmp_path):
    from lane_ray.errors import ConfigError

    cat = catalog(tmp_path / "catalog.parquet", [1, 2], ["a title", "another title"])
    with pytest.raises(ConfigError, match="tokenizer actor.*tokenize_stage=false"):
        embed_texts(cat, tmp_path / "emb", CFG.model_copy(update={"tokenize_stage": True}), RayConfig())


def test_incremental_embeds_only_new_and_changed(ray_cluster, tmp_path):
    titles = synth_titles(200, seed=1)
    ids = list(range(1, 201))
    cat = catalog(tmp_path / "c.parquet", ids, titles)
    out = tmp_path / "emb.parquet"
    embed_texts(cat, out, CFG, RayConfig())
    again = embed_texts(cat, out, CFG, RayConfig())
    assert again["embedded_now"] == 0 and again["reused"] == 200 and again["ray"] == {}  # Ray not even used
    new = dict(zip(ids, titles, strict=True))
    for i in (3, 50, 77):
        new[i] = new[i] + " (Director's Cut)"  # changed
    for i in (10, 11):
        del new[i]  # removed
    for i in range(500, 510):
        new[i] = f"Brand New Film {i}"  # added
    cat = catalog(tmp_path / "c.parquet", list(new), list(new.values()))
    m = embed_texts(cat, out, CFG, RayConfig())
    assert m["embedded_now"] == 13 and m["reused"] == 195 and m["rows"] == 208
    assert m["counts"]["removed_stale"] == 5  # 3 old titles + 2 removed items
    check_output(out, list(new), new)


def test_killed_job_resumes_without_recomputing_or_duplicates(ray_cluster, tmp_path):
    titles = synth_titles(2500, seed=2)
    ids = list(range(1, 2501))
    cat = catalog(tmp_path / "catalog.parquet", ids, titles)
    out = tmp_path / "emb.parquet"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lane_ray.cli", "embed", "--catalog", str(cat), "--out", str(out), "-q",
         "--set", "embed.rows_per_batch=40", "--set", "embed.batch_size=40"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    done_rows = 0
    while time.time() < deadline and proc.poll() is None:
        parts = list(out.glob("part-*.parquet")) if out.exists() else []
        if len(parts) >= 3:
            done_rows = sum(pq.read_metadata(p).num_rows for p in parts)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-job
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert done_rows > 0, f"no part appeared before the job ended: {proc.stderr.read().decode()[-2000:]}"
    (out / ".part-deadbeef.parquet.tmp").write_bytes(b"PAR1 half a file")  # a write cut short
    m = embed_texts(cat, out, CFG, RayConfig())
    assert 0 < m["embedded_now"] <= 2500 - done_rows
    assert m["reused"] >= done_rows
    assert m["counts"]["discarded_unfinished_writes"] >= 1
    check_output(out, ids, dict(zip(ids, titles, strict=True)))


def test_bad_titles_are_handled_and_counted(ray_cluster, tmp_path):
    ids = [1, 2, 3, 4, 5, 6, 6, 7, 7]
    raw = [b"Heat", None, b"", b"   ", b"Caf\xe9 Society", b"Casino", b"Casino", b"Babe", b"Babe: Pig in the City"]
    raw[0] = b"Heat " + b"very long " * 300
    table = pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(raw, pa.binary())})
    pq.write_table(table, tmp_path / "c.parquet")
    out = tmp_path / "emb.parquet"
    m = embed_texts(tmp_path / "c.parquet", out, CFG, RayConfig())
    c = m["counts"]
    assert (c["null_text"], c["empty_text"], c["invalid_utf8"], c["truncated"], c["duplicate_key"]) == (1, 2, 1, 1, 2)
    assert m["rows"] == 4 and m["input_rows"] == 9 and m["rejected"] == 5  # 4 embedded + 5 rejected = 9
    rej = pq.read_table(out / "_rejects.parquet").to_pylist()
    assert sorted((r["item_id"], r["reason"]) for r in rej) == [
        (2, "null_text"), (3, "empty_text"), (4, "empty_text"), (6, "duplicate_key"), (7, "duplicate_key")]
    t = read_embeddings(out)
    assert sorted(t["item_id"].to_pylist()) == [1, 5, 6, 7]
    assert dict(zip(t["item_id"].to_pylist(), t["text_sha1"].to_pylist(), strict=True))[7] == text_sha1("Babe")


def test_bad_input_files(ray_cluster, tmp_path):
    pq.write_table(pa.table({"item_id": ["a"], "title": ["x"]}), tmp_path / "strid.parquet")
    with pytest.raises(DataError, match="field 'item_id': key column must be integer"):
        embed_texts(tmp_path / "strid.parquet", tmp_path / "o1.parquet", CFG, RayConfig())
    pq.write_table(pa.table({"item_id": [1], "name": ["x"]}), tmp_path / "notitle.parquet")
    with pytest.raises(DataError, match="field 'title': missing column"):
        embed_texts(tmp_path / "notitle.parquet", tmp_path / "o2.parquet", CFG, RayConfig())
    (tmp_path / "trunc.parquet").write_bytes(b"PAR1\x00\x00")
    with pytest.raises(DataError, match="truncated or corrupt"):
        embed_texts(tmp_path / "trunc.parquet", tmp_path / "o3.parquet", CFG, RayConfig())


def test_lane_embed_command_on_a_run_directory(ray_cluster, tmp_path, capsys):
    from lane_ray.cli import main

    assert main(["data", "synth", "-q", "--items", "150", "--users", "20", "--out", str(tmp_path)]) == 0
    assert main(["embed", "--out", str(tmp_path), "--set", "embed.rows_per_batch=50"]) == 0
    out = capsys.readouterr().out
    assert "150 embeddings (dim 384): 150 new" in out
    assert read_embeddings(tmp_path / "item_embeddings.parquet").num_rows == 150
    assert main(["embed", "--out", str(tmp_path / "elsewhere"), "-q"]) == 2  # no catalogue there
