"""The skeleton of a cached, keyed LLM stage (preferences, explanations): part folders of rows keyed by everything a
row depends on, generation of only the missing keys by an actor pool, and compaction to one row per current key.

A stage computes the keys of the rows it needs (``uint64``, :func:`lane_ray.text.rows.key64`), asks
:meth:`KeyedParts.missing` which are not stored yet, has them generated (:meth:`KeyedParts.generate`: each batch
lands as one atomic part file, so a killed job keeps every finished batch), then reads :meth:`KeyedParts.live`
(one row per current key; rows of older keys drop out) and stores what it keeps with :meth:`KeyedParts.replace`:
the new parts are written before the old ones are deleted, so a crash in between leaves duplicates (removed by
the next compaction), never a loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lane_ray.io import read_parquet
from lane_ray.pipeline.sink import map_to_parts, part_files, remove_unfinished, write_part
from lane_ray.progress import NewEntries, RssSampler, expect


class KeyedParts:
    """The part folders ``dirs`` of one stage (the first receives what is generated), whose rows' keys
    ``row_keys(table)`` computes from the stored ``key_columns``; ``schema`` is the rows' schema. Opening removes
    the temporary files of writes that never finished (counted in ``unfinished``)."""

    def __init__(self, dirs: Sequence[Path], row_keys: Callable[[pa.Table], np.ndarray], key_columns: list[str],
                 schema: pa.Schema) -> None:
        self.dirs, self.row_keys, self.key_columns, self.schema = list(dirs), row_keys, key_columns, schema
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.unfinished = sum(remove_unfinished(d) for d in self.dirs)
        self.generate_seconds = 0.0
        self.peak_rss_mb: float | None = None

    def _stored(self, columns: list[str] | None = None) -> pa.Table:
        """Every stored row (``columns`` only, when given) in the stage's schema; a column that parts of an older
        layout lack is null there."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        tables = [read_parquet(d, columns=columns) for d in self.dirs if part_files(d)]
        return pa.concat_tables([pa.table([t[f.name].cast(f.type) if f.name in t.column_names
                                           else pa.nulls(t.num_rows, f.type) for f in schema], schema=schema)
                                 for t in tables]) if tables else schema.empty_table()

    def _keys(self, table: pa.Table) -> np.ndarray:
        return self.row_keys(table) if table.num_rows else np.zeros(0, np.uint64)

    def missing(self, current: np.ndarray) -> np.ndarray:
        """Indices of the ``current`` keys that no stored row has."""
        return np.flatnonzero(~np.isin(current, self._keys(self._stored(self.key_columns))))

    def generate(self, inputs: pa.Table, worker_cls: type, ctor: dict[str, Any], batch_size: int, actors: int,
                 cpus_per_actor: float, gpus_per_actor: float, use_ray: bool, unit: str, rate_key: str,
                 connect: Callable[[], Any] | None = None, worker: Any = None) -> float:
        """Map ``inputs`` through ``worker_cls(**ctor)`` into the first folder, one part per batch
        (:func:`lane_ray.pipeline.sink.map_to_parts`), with the progress view counting the new rows in ``unit``;
        ``connect`` (e.g. ``init_ray``) runs first when Ray is used. Returns the seconds it took."""
        with RssSampler() as rss:
            t0 = time.perf_counter()
            if use_ray and connect is not None:
                connect()
            expect(inputs.num_rows, NewEntries(self.dirs[0]), unit, rate_key=rate_key)
            map_to_parts(inputs, worker_cls, ctor, self.dirs[0], batch_size, actors, cpus_per_actor, gpus_per_actor,
                         use_ray, worker=worker)
            self.generate_seconds = time.perf_counter() - t0
        self.peak_rss_mb = rss.peak_mb
        return self.generate_seconds

    def live(self, current: np.ndarray) -> tuple[pa.Table, bool]:
        """The stored rows whose key is current, one per key (the first found); and whether that is every stored
        row (nothing to compact)."""
        table = self._stored()
        keys = self._keys(table)
        first = np.zeros(keys.size, dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        keep = np.isin(keys, current) & first
        return table.filter(pa.array(keep)), bool(keep.all())

    def replace(self, tables: Sequence[tuple[Path, pa.Table]], metadata: dict[bytes, bytes] | None = None) -> None:
        """Store each ``(folder, table)`` as one part of its folder, then delete every part there was before."""
        old = [p for d in self.dirs for p in part_files(d)]
        for folder, table in tables:
            write_part(folder, table, metadata)
        for p in old:  # written first, removed after: a crash in between leaves duplicates, never a loss
            p.unlink()


__all__ = ["KeyedParts"]
