"""Cluster job entry points (``main(argv=None)``), launchable with ``ray job submit -- python jobs/<x>.py``.

Each job is one ``lane`` command: :func:`run_lane` is what they share."""

from __future__ import annotations

import sys


def run_lane(command: list[str], argv: list[str] | None = None) -> int:
    """Run ``lane <command> <argv>``; ``argv`` defaults to the process arguments. The exit status of ``lane``."""
    from lane_ray.cli import main

    return main([*command, *(sys.argv[1:] if argv is None else argv)])


__all__ = ["run_lane"]
