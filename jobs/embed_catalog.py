"""Catalogue title embedding as a cluster job (same as ``lane embed``).

    ray job submit --working-dir . -- python jobs/embed_catalog.py --out runs/default
    ray job submit --working-dir . -- python jobs/embed_catalog.py --catalog s3://.../catalog.parquet \\
        --out runs/big/item_embeddings.parquet --set embed.rows_per_batch=8192

Inside a Ray job the driver attaches to the job's cluster ($RAY_ADDRESS); re-submitting after a failure
embeds only what is missing.
"""

from __future__ import annotations

import sys

from jobs import run_lane


def main(argv: list[str] | None = None) -> int:
    """Run ``lane embed`` with ``argv`` (defaults to the process arguments)."""
    return run_lane(["embed"], argv)


if __name__ == "__main__":
    sys.exit(main())
