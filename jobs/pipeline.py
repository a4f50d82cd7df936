"""The whole LANE pipeline as one cluster job (same as ``lane run``).

    ray job submit --working-dir . -- python jobs/pipeline.py --out runs/default
"""

from __future__ import annotations

import sys

from jobs import run_lane


def main(argv: list[str] | None = None) -> int:
    """Run ``lane run`` with ``argv`` (defaults to the process arguments)."""
    return run_lane(["run"], argv)


if __name__ == "__main__":
    sys.exit(main())
