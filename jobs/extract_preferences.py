"""LLM preference extraction as a cluster job (same as ``lane preferences``).

    ray job submit --working-dir . -- python jobs/extract_preferences.py --dataset ml-100k --out runs/default
    ray job submit --working-dir . -- python jobs/extract_preferences.py --out runs/default \\
        --set llm.backend=vllm --set llm.model=/models/Qwen2.5-7B-Instruct

Re-submitting after a failure only extracts the users whose preferences are missing.
"""

from __future__ import annotations

import sys

from jobs import run_lane


def main(argv: list[str] | None = None) -> int:
    """Run ``lane preferences`` with ``argv`` (defaults to the process arguments)."""
    return run_lane(["preferences"], argv)


if __name__ == "__main__":
    sys.exit(main())
