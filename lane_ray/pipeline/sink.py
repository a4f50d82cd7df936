"""Atomic part files: the datasink every resumable stage writes through, and the helpers that read and
compact what it wrote."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lane_ray.atomic import publish

PART_PREFIX = "part-"


def write_part(out: Path, table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> Path:
    """Write ``table`` as ``out/part-<uuid>.parquet`` through a temporary name (:func:`lane_ray.atomic.publish`)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
    tmp = out / f".{name}.tmp"
    pq.write_table(table, tmp)
    return publish(tmp, out / name)


def write_part_uri(uri: str, table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> str:
    """:func:`write_part` into a folder given by a pyarrow filesystem URI (``s3://``, ``gs://``, ...): written
    to a temporary object, then moved to its name (an object store creates the final object in one step)."""
    from lane_ray.storage import atomic_object, join_uri, resolve_uri

    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    fs, root = resolve_uri(uri)
    name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
    with atomic_object(fs, f"{root.rstrip('/')}/{name}") as fh:
        pq.write_table(table, fh)
    return join_uri(uri, name)


def make_part_sink(out: Path, metadata: dict[bytes, bytes] | None = None) -> Any:
    """A Ray Data ``Datasink`` writing each block as one part file (whole or not at all): into ``out``, or, when
    the run is staged from a remote directory, straight into its remote folder (workers on other nodes cannot
    see the driver's disk; :func:`finish_parts` copies them into ``out`` afterwards)."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    writer = PartWriter(out, metadata)

    class AtomicPartSink(Datasink):
        def write(self, blocks: Iterable[Any], ctx: Any) -> int:
            return sum(writer.write(BlockAccessor.for_block(block).to_arrow()) for block in blocks)

    return AtomicPartSink()


class PartWriter:
    """Writes a table as one atomic part of ``out`` (or of its remote folder, as :func:`make_part_sink`) from
    inside a ``map_batches`` worker and returns a one-row ``rows`` table: the worker that computed a block writes
    it, so the block never goes through the object store to a separate write task."""

    def __init__(self, out: Path, metadata: dict[bytes, bytes] | None = None) -> None:
        from lane_ray.storage import remote_dir

        self.out, self.metadata, self.remote = out, metadata, remote_dir(out)

    def write(self, table: pa.Table) -> int:
        """Write ``table`` (nothing when empty); return its rows."""
        if table.num_rows:
            if self.remote is not None:
                write_part_uri(self.remote, table, self.metadata)
            else:
                write_part(self.out, table, self.metadata)
        return table.num_rows

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.table({"rows": pa.array([self.write(table)], pa.int64())})


def finish_parts(out: Path) -> None:
    """After a dataset was written through :func:`make_part_sink` or :class:`PartWriter`: bring parts written
    remotely into ``out``."""
    from lane_ray.storage import pull_dir

    pull_dir(out)


def map_to_parts(table: pa.Table, worker_cls: type, ctor_kwargs: dict[str, Any], out: Path, batch_size: int,
                 actors: int, cpus_per_actor: float, gpus_per_actor: float, use_ray: bool = True,
                 worker: Any = None) -> None:
    """Run ``worker_cls(**ctor_kwargs)`` over ``table`` in batches of ``batch_size`` rows, each result written
    as one atomic part file of ``out``: with Ray, blocks of exactly one batch mapped by an actor pool of
    1..``actors`` (each loads its model once); in-process (tests, debugging; ``worker`` may be given) the
    same calls in a loop."""
    if use_ray:
        import ray

        ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=batch_size)
        ds = ds.map_batches(worker_cls, batch_format="pyarrow", batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, fn_constructor_kwargs=ctor_kwargs)
        ds.write_datasink(make_part_sink(out))
        finish_parts(out)
        return
    worker = worker or worker_cls(**ctor_kwargs)
    for start in range(0, table.num_rows, batch_size):
        write_part(out, worker(table.slice(start, batch_size)))


def part_files(out: Path) -> list[Path]:
    return sorted(out.glob(f"{PART_PREFIX}*.parquet")) if out.exists() else []


def remove_unfinished(out: Path) -> int:
    """Delete temporary files of writes that never finished; return how many."""
    n = 0
    if out.exists():
        for tmp in out.glob(f".{PART_PREFIX}*"):
            tmp.unlink()
            n += 1
    return n
