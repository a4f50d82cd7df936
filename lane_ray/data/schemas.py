"""Canonical Arrow schemas (docs/design.md) and helpers that coerce loader output onto them."""

from __future__ import annotations

import pyarrow as pa

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
    ]
)
RATING_FIELD = pa.field("rating", pa.float32())

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
    ]
)
# Optional catalogue text columns, kept when a loader provides them.
CATALOG_TEXT_COLUMNS = ("genres", "year", "source_id")

USER_IDS_SCHEMA = pa.schema(
    [pa.field("user_id", pa.int64(), nullable=False), pa.field("source_id", pa.string(), nullable=False)]
)


def interactions_table(
    user_id: pa.Array, item_id: pa.Array, timestamp: pa.Array, rating: pa.Array | None = None
) -> pa.Table:
    """Assemble an ``interactions`` table with canonical column types and order."""
    arrays = [user_id.cast(pa.int64()), item_id.cast(pa.int64()), timestamp.cast(pa.int64())]
    fields = list(INTERACTIONS_SCHEMA)
    if rating is not None:
        arrays.append(rating.cast(pa.float32()))
        fields.append(RATING_FIELD)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def catalog_table(item_id: pa.Array, title: pa.Array, **text: pa.Array | None) -> pa.Table:
    """Assemble a ``catalog`` table: ``item_id``, ``title`` and any optional text columns given."""
    arrays = [item_id.cast(pa.int64()), title.cast(pa.string())]
    fields = list(CATALOG_SCHEMA)
    for name, values in text.items():
        if values is None:
            continue
        arrays.append(values.cast(pa.string()))
        fields.append(pa.field(name, pa.string()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
