"""The whole LANE pipeline as one cluster job (same as ``lane run``).

    ray job submit --working-dir . -- python jobs/pipeline.py --out runs/default
"""

from __future__ import annotations

import sys

from lane_ray.cli import main as lane_main


def main(argv: list[str] | None = None) -> int:
    """Run ``lane run`` with ``argv`` (defaults to the process arguments)."""
    return lane_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
