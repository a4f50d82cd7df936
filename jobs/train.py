"""Recommender training with Ray Train as a cluster job (same as ``lane train``).

    ray job submit --working-dir . -- python jobs/train.py --out runs/default --variant lane --workers 2
    ray job submit --working-dir . -- python jobs/train.py --out runs/default --variant id \\
        --set train.use_gpu=true --set train.num_workers=4

Workers that die are restarted (``train.max_failures``) and resume from the last epoch's checkpoint. The run
directory must be on storage every node sees (Ray Train persists checkpoints under ``OUT/ray_train``).
"""

from __future__ import annotations

import sys

from jobs import run_lane


def main(argv: list[str] | None = None) -> int:
    """Run ``lane train`` with ``argv`` (defaults to the process arguments)."""
    return run_lane(["train"], argv)


if __name__ == "__main__":
    sys.exit(main())
