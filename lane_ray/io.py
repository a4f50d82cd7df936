"""Small I/O helpers shared by every stage: atomic writes and Parquet reading.

Every artifact is written to a temporary name in the destination directory and renamed into place, so
a crash leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lane_ray.atomic import atomic_open, atomic_path
from lane_ray.errors import DataError


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_parquet(path: str | Path, table: pa.Table, **kwargs: Any) -> None:
    """Write ``table`` to one Parquet file, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files behind ``path``: the file itself, or the sorted parts of a directory."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
        if not parts:
            raise DataError("directory holds no .parquet files", file=path)
        return parts
    if not path.exists():
        raise DataError("file not found", file=path)
    return [path]


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a directory of Parquet parts; a corrupt file raises :class:`DataError`."""
    tables = []
    for part in parquet_files(path):
        if part.stat().st_size == 0:
            raise DataError("file is empty", file=part)
        try:
            pf = pq.ParquetFile(part)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"not a readable Parquet file (truncated or corrupt): {exc}", file=part) from None
        if columns is not None:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(
                    f"missing column (found: {', '.join(pf.schema_arrow.names)})", file=part, field=missing[0]
                )
        try:
            tables.append(pf.read(columns=columns))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"not a readable Parquet file (truncated or corrupt): {exc}", file=part) from None
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default")
