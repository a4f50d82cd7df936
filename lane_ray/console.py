"""The one line format of everything LANE-Ray tells the user on stderr (``[lane] ...``). Standard library only,
so that any module can report without importing the progress machinery (``lane_ray/progress.py``)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(f"[lane] {msg}", file=sys.stderr, flush=True)


__all__ = ["log"]
