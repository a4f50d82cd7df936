"""Dataset preparation as a cluster job (same as ``lane data prepare``).

    ray job submit --working-dir . -- python jobs/prepare_data.py ml-100k --out runs/default
"""

from __future__ import annotations

import sys

from lane_ray.cli import main as lane_main


def main(argv: list[str] | None = None) -> int:
    """Run ``lane data prepare`` with ``argv`` (defaults to the process arguments)."""
    return lane_main(["data", "prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
