"""The cached, keyed stage skeleton (lane_ray/pipeline/keyed_parts.py) shared by preferences and explanations:
which keys are missing, one live row per current key, write-then-delete compaction, older part layouts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lane_ray.pipeline.keyed_parts import KeyedParts
from lane_ray.pipeline.sink import part_files, write_part
from lane_ray.text.rows import key64, text_sha1

SCHEMA = pa.schema([("user_id", pa.int64()), ("version", pa.string()), ("value", pa.string()),
                    ("note", pa.string())])


def keys_of(t: pa.Table) -> np.ndarray:
    return key64([t["user_id"].to_numpy()], [text_sha1(v) for v in t["version"].to_pylist()])


def rows(users, version="v1", value="x") -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.int64()), "version": [version] * len(users),
                     "value": [f"{value}{u}" for u in users], "note": [None] * len(users)}, schema=SCHEMA)


def current(users, version="v1") -> np.ndarray:
    return key64([np.asarray(users, np.int64)], [text_sha1(version)] * len(users))


def test_missing_live_and_compaction(tmp_path):
    out = tmp_path / "parts"
    parts = KeyedParts([out], keys_of, ["user_id", "version"], SCHEMA)
    assert parts.missing(current([1, 2, 3])).tolist() == [0, 1, 2]  # nothing stored yet
    write_part(out, rows([1, 2]))
    write_part(out, rows([2], value="dup"))  # a retried batch: the same key twice
    write_part(out, rows([3], version="old"))  # an older recipe: not a current key
    assert parts.missing(current([1, 2, 3])).tolist() == [2]
    live, compact = parts.live(current([1, 2, 3]))
    assert not compact and sorted(live["user_id"].to_pylist()) == [1, 2]  # one row per current key
    old = part_files(out)
    parts.replace([(out, live)])
    assert not set(part_files(out)) & set(old) and len(part_files(out)) == 1
    again, compact = KeyedParts([out], keys_of, ["user_id", "version"], SCHEMA).live(current([1, 2]))
    assert compact and again.num_rows == 2


def test_replace_writes_before_it_deletes(tmp_path, monkeypatch):
    """A crash right after the first old part is removed keeps every live row (the new part exists already)."""
    out = tmp_path / "parts"
    out.mkdir()
    write_part(out, rows([1, 2]))
    write_part(out, rows([3]))
    parts = KeyedParts([out], keys_of, ["user_id", "version"], SCHEMA)
    live, _ = parts.live(current([1, 2, 3]))
    unlink = type(out).unlink

    def crash_after_one(self, *a, **k):
        unlink(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(out), "unlink", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        parts.replace([(out, live)])
    monkeypatch.undo()
    stored = pa.concat_tables([pq.read_table(p) for p in part_files(out)])
    assert set(stored["user_id"].to_pylist()) == {1, 2, 3}


def test_parts_of_an_older_layout_read_with_nulls(tmp_path):
    out = tmp_path / "parts"
    out.mkdir()
    write_part(out, rows([1]).drop_columns(["note"]))  # written before the stage had a `note` column
    write_part(out, rows([2]))
    parts = KeyedParts([out], keys_of, ["user_id", "version"], SCHEMA)
    live, _ = parts.live(current([1, 2]))
    assert live.schema == SCHEMA and live.num_rows == 2 and live["note"].null_count == 2


def test_unfinished_writes_are_removed_and_counted(tmp_path):
    out = tmp_path / "parts"
    out.mkdir()
    (out / ".part-abc.parquet.tmp").write_bytes(b"half")
    parts = KeyedParts([out, tmp_path / "aux"], keys_of, ["user_id", "version"], SCHEMA)
    assert parts.unfinished == 1 and not list(out.glob(".part-*")) and (tmp_path / "aux").is_dir()
