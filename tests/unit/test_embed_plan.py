"""The embedding stage's planner and compaction, bucketed (no Ray, no encoder): the same decisions whatever
the number of buckets, and Ray tasks select exactly the planned rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lane_ray.pipeline.embed_compact import compact
from lane_ray.pipeline.embed_plan import CATALOG_TEXTS, plan, select_rows
from lane_ray.pipeline.sink import write_part
from lane_ray.text.rows import text_sha1

ENC = "enc@test"


def catalogue(path: Path, ids: list[int], titles: list[str | None]) -> Path:
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.string())}), path,
                   row_group_size=700)
    return path


def fake_embed(out: Path, table: pa.Table) -> None:
    """What the Ray stage writes for ``table`` (rows from select_rows), with dummy vectors."""
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(table.num_rows * 2, np.float32)), 2)
    write_part(out, pa.table({"item_id": table["item_id"], "text_sha1": table["text_sha1"], "embedding": emb}),
               {b"lane.encoder": ENC.encode()})


def run_once(src: Path, out: Path, scratch: Path, bucket_rows: int):
    scratch.mkdir()
    p = plan(src, out, CATALOG_TEXTS, ENC, 2000, scratch, bucket_rows)
    chosen = select_rows(pq.read_table(src), p.key_filter(), ("item_id",), "title", 2000)
    assert chosen.num_rows == p.n_todo + int(np.sum(_same_text_repeats(src)))  # repeats are compacted away
    if chosen.num_rows:
        fake_embed(out, chosen)
    stats = compact(out, CATALOG_TEXTS, p)
    return p, chosen, stats


def _same_text_repeats(src: Path) -> list[bool]:
    t = pq.read_table(src).to_pylist()
    seen: dict[int, str | None] = {}
    out = []
    for r in t:
        if r["item_id"] in seen:
            out.append(seen[r["item_id"]] == r["title"] and bool((r["title"] or "").strip()))
        else:
            seen[r["item_id"]] = r["title"]
    return out


@pytest.mark.parametrize("bucket_rows", [1024, 1_000_000])
def test_plan_is_the_same_for_any_number_of_buckets(tmp_path, bucket_rows):
    rng = np.random.default_rng(0)
    n = 5000
    ids = list(range(1, n + 1)) + [7, 8, 9]  # repeats: 7 same title, 8 other title, 9 after a NULL
    titles: list[str | None] = [f"title {i}" for i in range(1, n + 1)] + ["title 7", "other 8", "title 9"]
    titles[8] = None  # item 9's first row is NULL: it is rejected, its repeat too (first row wins)
    titles[99] = "   "
    order = rng.permutation(n)  # shuffled input: "first" means first in the file, not smallest id
    ids = [ids[i] for i in order] + ids[n:]
    titles = [titles[i] for i in order] + titles[n:]
    src = catalogue(tmp_path / "cat.parquet", ids, titles)
    out = tmp_path / "out"
    out.mkdir()

    p, chosen, stats = run_once(src, out, tmp_path / "s1", bucket_rows)
    assert p.bits == (3 if bucket_rows == 1024 else 0)
    assert p.rows == n + 3 and p.n_current == n - 2 and p.n_todo == n - 2 and p.reused == 0
    assert p.counts["null_text"] == 1 and p.counts["empty_text"] == 1 and p.counts["duplicate_key"] == 3
    assert sorted(zip(p.rejects["item_id"].to_pylist(), p.rejects["reason"].to_pylist(), strict=True)) == [
        (7, "duplicate_key"), (8, "duplicate_key"), (9, "duplicate_key"), (9, "null_text"), (100, "empty_text")]
    assert stats == {"removed_stale": 0, "removed_duplicates": 1, "rows": n - 2}  # item 7 embedded twice
    got = pq.read_table(out)
    assert got.num_rows == n - 2 and len(set(got["item_id"].to_pylist())) == n - 2
    assert dict(zip(got["item_id"].to_pylist(), got["text_sha1"].to_pylist(), strict=True))[8] == text_sha1("title 8")

    # change 10 titles, remove 5 items, add 3: only the 13 new keys are chosen; stale rows are compacted away
    t = pq.read_table(src).slice(0, n).to_pylist()
    t = [r for r in t if r["item_id"] not in {1, 2, 3, 4, 5}]
    for r in t:
        if 11 <= r["item_id"] <= 20:
            r["title"] = f"changed {r['item_id']}"
    t += [{"item_id": n + k, "title": f"new {k}"} for k in (1, 2, 3)]
    src2 = catalogue(tmp_path / "cat2.parquet", [r["item_id"] for r in t], [r["title"] for r in t])
    p2, chosen2, stats2 = run_once(src2, out, tmp_path / "s2", bucket_rows)
    assert p2.n_todo == 13 and p2.filter_mode == "keep"
    assert sorted(chosen2["item_id"].to_pylist()) == [*range(11, 21), n + 1, n + 2, n + 3]
    assert stats2["removed_stale"] == 15 and stats2["removed_duplicates"] == 0
    assert stats2["rows"] == p2.n_current == pq.read_table(out).num_rows


def test_fresh_run_passes_the_short_skip_list(tmp_path):
    ids = list(range(1, 3001)) + [5]
    src = catalogue(tmp_path / "cat.parquet", ids, [f"t{i}" for i in ids[:-1]] + ["another"])
    (tmp_path / "s").mkdir()
    p = plan(src, tmp_path / "out", CATALOG_TEXTS, ENC, 2000, tmp_path / "s", 1024)
    flt = p.key_filter()
    assert p.filter_mode == "skip" and flt.keys.size == 1  # the repeated key with another title
    chosen = select_rows(pq.read_table(src), flt, ("item_id",), "title", 2000)
    assert chosen.num_rows == 3000 and chosen["item_id"].to_pylist() == list(range(1, 3001))
