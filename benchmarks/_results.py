"""Shared tail of the benchmark scripts: print the result and keep a copy in ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def emit(result: dict[str, Any], name: str, save: bool, one_line: bool) -> int:
    """Write ``results/<name>.json`` (when ``save``) and print the result (one JSON line with ``one_line``)."""
    if save:
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if one_line else json.dumps(result, indent=2))
    return 0
