"""Dataset preparation as a cluster job (same as ``lane data prepare``).

    ray job submit --working-dir . -- python jobs/prepare_data.py ml-100k --out runs/default
"""

from __future__ import annotations

import sys

from jobs import run_lane


def main(argv: list[str] | None = None) -> int:
    """Run ``lane data prepare`` with ``argv`` (defaults to the process arguments)."""
    return run_lane(["data", "prepare"], argv)


if __name__ == "__main__":
    sys.exit(main())
