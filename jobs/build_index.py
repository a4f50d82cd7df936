"""Build the serving app's ANN index of a checkpoint as a cluster job (same as ``lane index``).

    ray job submit --working-dir . -- python jobs/build_index.py --run runs/default --checkpoint lane
    ray job submit --working-dir . -- python jobs/build_index.py --run /shared/runs/big --kind ivf

The index goes to ``RUN/index/<checkpoint>/`` (``index.faiss`` + ``index.json``); serve it with
``--set serve.ann_index=auto``. Needs the ``ann`` extra (faiss-cpu) on the node that runs the job.
"""

from __future__ import annotations

import sys

from jobs import run_lane


def main(argv: list[str] | None = None) -> int:
    """Run ``lane index`` with ``argv`` (defaults to the process arguments)."""
    return run_lane(["index"], argv)


if __name__ == "__main__":
    sys.exit(main())
