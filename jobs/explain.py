"""CoT explanations of recommended items as a cluster job (same as ``lane explain``).

    ray job submit --working-dir . -- python jobs/explain.py --candidates runs/default/candidates.parquet \\
        --out runs/default --top-k 5
    ray job submit --working-dir . -- python jobs/explain.py --candidates cands.jsonl --out runs/default \\
        --set llm.backend=vllm --set llm.model=/models/Qwen2.5-7B-Instruct --gpus-per-actor 1

Re-submitting after a failure only explains the candidates whose explanation is missing.
"""

from __future__ import annotations

import sys

from jobs import run_lane


def main(argv: list[str] | None = None) -> int:
    """Run ``lane explain`` with ``argv`` (defaults to the process arguments)."""
    return run_lane(["explain"], argv)


if __name__ == "__main__":
    sys.exit(main())
