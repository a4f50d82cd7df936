"""Writes are atomic: a process SIGKILLed at a random moment while it rewrites artifacts leaves each one either
whole in its old version or whole in its new one, never partial."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time

import pyarrow.parquet as pq
import pytest

TRIALS = 60

def writer(out: str, k: int, conn) -> None:
    """Rewrite every kind of artifact in a loop; report each finished round on ``conn``."""
    from pathlib import Path

    import pyarrow as pa

    from lane_ray.atomic import atomic_open
    from lane_ray.io import write_json, write_parquet
    from lane_ray.pipeline.sink import write_part

    folder = Path(out)
    (folder / "parts").mkdir(exist_ok=True)
    while True:
        k += 1
        pad = "x" * (50_000 + 997 * (k % 50))  # sizes change between versions: a torn write cannot look whole
        write_json(folder / "doc.json", {"v": k, "pad": pad, "n": len(pad)})
        write_parquet(folder / "table.parquet", pa.table({"v": pa.array([k] * (20_000 + k % 7), pa.int64())}))
        with atomic_open(folder / "notes.md") as fh:
            fh.write(f"version {k}\n" + pad + f"\nend {k}\n")
        write_part(folder / "parts", pa.table({"v": [k] * 1000}))
        conn.send(k)


def check(out):
    doc = json.loads((out / "doc.json").read_text())
    assert len(doc["pad"]) == doc["n"]
    t = pq.read_table(out / "table.parquet")
    vals = set(t["v"].to_pylist())
    assert len(vals) == 1 and t.num_rows == 20_000 + next(iter(vals)) % 7
    lines = (out / "notes.md").read_text().splitlines()
    assert lines[0].startswith("version ") and lines[-1] == "end " + lines[0].split()[1]
    for part in (out / "parts").glob("part-*.parquet"):
        p = pq.read_table(part)
        assert p.num_rows == 1000 and len(set(p["v"].to_pylist())) == 1
    return doc["v"]


def test_killed_writers_leave_old_or_new_never_partial(tmp_path):
    # writers fork from a server that has the I/O modules imported already: a trial costs its writes, not an
    # interpreter start
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pyarrow.parquet", "lane_ray.io", "lane_ray.pipeline.sink"])
    rng = random.Random(7)
    version, kills_mid_write = 0, 0
    for _ in range(TRIALS):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=writer, args=(str(tmp_path), version, send), daemon=True)
        proc.start()
        send.close()
        last_done = recv.recv()  # one full round written: every artifact exists from here on
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        while recv.poll():
            try:
                last_done = recv.recv()
            except EOFError:
                break
        got = check(tmp_path)
        # the files hold the last finished round, or the round in flight when the kill came (renamed already)
        assert got in (last_done, last_done + 1)
        leftovers = [*tmp_path.glob(".*.tmp"), *(tmp_path / "parts").glob(".*.tmp")]
        kills_mid_write += bool(leftovers)
        version = got
        for tmp in leftovers:
            tmp.unlink()  # what a stage's clean-up (remove_unfinished) does before it resumes
    # the kills did land inside writes (a temporary left behind), not only between them
    assert kills_mid_write >= TRIALS // 4


def test_publish_moves_files_and_folders_into_place_and_refuses_a_full_folder(tmp_path):
    from lane_ray.atomic import atomic_path, publish

    (tmp_path / "a.txt").write_text("new")
    (tmp_path / "dest.txt").write_text("old")
    assert publish(tmp_path / "a.txt", tmp_path / "dest.txt").read_text() == "new"
    assert not (tmp_path / "a.txt").exists()
    folder = tmp_path / "tmpdir"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"x")
    publish(folder, tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "x.bin").read_bytes() == b"x" and not folder.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "y").write_text("y")
    with pytest.raises(OSError):  # a folder never replaces a folder that holds something
        publish(other, tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "x.bin").exists() and (other / "y").exists()
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "dest.txt") as tmp:  # a failed block changes nothing
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert (tmp_path / "dest.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest.txt", "other", "out"]
