"""Shared tail of the benchmark scripts: print the result and keep a copy in ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def emit(result: dict[str, Any], name: str | None = None, save: bool = False, one_line: bool = True,
         out_json: str | Path | None = None, show: bool = True) -> int:
    """Write ``results/<name>.json`` (when ``save``) and ``out_json`` (when given), then print the result (one
    JSON line with ``one_line``, else indented; nothing without ``show``). Returns 0, the script's exit status."""
    text = json.dumps(result, indent=2) + "\n"
    if save and name:
        (RESULTS / f"{name}.json").write_text(text)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(text)
    if show:
        print(json.dumps(result) if one_line else text, end="\n" if one_line else "")
    return 0
