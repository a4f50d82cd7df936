"""Synthetic-data generator at scale: wall time and peak memory for N items and M users.

    python benchmarks/synth_scale.py --items 10000000 --users 100000 --json

Runs ``lane data synth`` in a child process and samples its RSS; prints one JSON line
``{"items", "users", "interactions", "seconds", "peak_rss_mb", "items_per_s"}`` and writes it to
``--out-json`` when given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _results import emit


def measure(items: int, users: int, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "lane_ray.cli", "data", "synth", "-q", "--items", str(items), "--users", str(users),
           "--out", str(out_dir)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"synth failed: {err.strip()}")
    summary = json.loads((out_dir / "data" / "synth.json").read_text())
    return {"items": items, "users": users, "interactions": summary["interactions"], "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak / 2**20, 1), "items_per_s": round(items / seconds)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--out-json", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.items, args.users, Path(tmp))
    return emit(result, out_json=args.out_json)


if __name__ == "__main__":
    sys.exit(main())
