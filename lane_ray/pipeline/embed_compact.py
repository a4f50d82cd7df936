"""Compaction of the embedding stage's output (:mod:`lane_ray.pipeline.embed`): rows whose key is no longer in the
input (old titles, removed items) and repeated keys (a retried task) are removed from the parts they are in, each
part rewritten atomically. Works bucket by bucket like the plan (:mod:`lane_ray.pipeline.embed_plan`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lane_ray.io import write_parquet
from lane_ray.pipeline.embed_plan import Plan, TextTable, spill_parts
from lane_ray.pipeline.sink import PART_PREFIX


def compact(out: Path, spec: TextTable, p: Plan) -> dict[str, int]:
    """Remove rows whose key is not current and repeated keys; rewrite touched parts atomically. Works bucket by
    bucket like the plan; returns the counts and the rows the output holds afterwards."""
    parts = sorted(out.glob(f"{PART_PREFIX}*.parquet"))
    stats = {"removed_stale": 0, "removed_duplicates": 0, "rows": 0}
    if not parts:
        return stats
    spill = spill_parts(parts, spec, p.folder, p.bits)
    drops: list[np.ndarray] = []  # (part, row) of every row to remove
    for b in range(1 << p.bits):
        rec, current = spill.load(b), p.current(b)
        pos = np.minimum(np.searchsorted(current, rec["key"]), max(current.size - 1, 0))
        live = (current[pos] == rec["key"]) if current.size else np.zeros(rec.size, bool)
        first = np.zeros(rec.size, dtype=bool)
        first[np.unique(rec["key"], return_index=True)[1]] = True
        stats["removed_stale"] += int((~live).sum())
        stats["removed_duplicates"] += int((live & ~first).sum())
        stats["rows"] += int((live & first).sum())
        drop = rec[~(live & first)]
        drops.append(np.stack([drop["part"].astype(np.int64), drop["row"].astype(np.int64)], axis=1))
    drop_all = np.concatenate(drops)
    if not drop_all.size:
        return stats
    drop_all = drop_all[np.argsort(drop_all[:, 0], kind="stable")]
    touched, starts = np.unique(drop_all[:, 0], return_index=True)
    for i, rows in zip(touched, np.split(drop_all[:, 1], starts[1:]), strict=True):
        part = parts[i]
        n = pq.read_metadata(part).num_rows
        if rows.size >= n:
            part.unlink()
            continue
        keep = np.ones(n, dtype=bool)
        keep[rows] = False
        write_parquet(part, pq.read_table(part).filter(pa.array(keep)))
    return stats


__all__ = ["compact"]
