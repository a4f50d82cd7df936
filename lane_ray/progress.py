"""Progress and resource accounting for stages: wall time, peak RSS (sampled) and row counts.

``with Stage("data", run_dir) as st: ...; st.rows = n`` prints start/finish lines to stderr and merges
``{"seconds", "peak_rss_mb", "peak_tree_rss_mb", "rows"}`` into ``<run_dir>/timings.json``: ``peak_rss_mb`` is
this process's, ``peak_tree_rss_mb`` that of this process and its children (with a local Ray cluster it started:
every Ray process of the node; see :class:`RssSampler`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from lane_ray.io import write_json


class RssSampler:
    """Samples the resident set size of this process (and, optionally, its children) in a thread.

    With ``children`` (the local Ray cluster a driver started is its child tree: GCS, raylet, workers) the
    figure is the private (anonymous) memory of every process plus the largest shared mapping of any one of
    them, so the object store and shared libraries mapped by every worker are counted once, not per process.
    """

    def __init__(self, interval: float = 0.05, children: bool = False) -> None:
        self.interval = interval
        self.children = children
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        if not self.children:
            return self._proc.memory_info().rss
        private, shared = 0, 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                mi = p.memory_info()
            except psutil.Error:
                continue
            sh = getattr(mi, "shared", 0)
            private += mi.rss - sh
            shared = max(shared, sh)
        return private + shared

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def log(msg: str) -> None:
    print(f"[lane] {msg}", file=sys.stderr, flush=True)


class Stage:
    """Times a pipeline stage, samples its peak memory and records both in ``timings.json``."""

    def __init__(self, name: str, run_dir: str | Path | None = None, quiet: bool = False) -> None:
        self.name = name
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quiet = quiet
        self.rows: int | None = None
        self.skipped = False
        self.extra: dict[str, Any] = {}
        self._sampler = RssSampler()
        self._tree = RssSampler(interval=0.5, children=True)

    def __enter__(self) -> Stage:
        if not self.quiet:
            log(f"{self.name}: started")
        self._t0 = time.perf_counter()
        self._sampler.__enter__()
        self._tree.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._sampler.__exit__()
        self._tree.__exit__()
        self.seconds = round(time.perf_counter() - self._t0, 3)
        if et is not None:
            if not self.quiet:
                log(f"{self.name}: failed after {self.seconds:.1f}s")
            return
        if not self.quiet:
            what = "skipped (output is current)" if self.skipped else "done"
            rows = f", {self.rows:,} rows" if self.rows is not None else ""
            log(f"{self.name}: {what} in {self.seconds:.1f}s{rows}, peak RSS {self._sampler.peak_mb:.0f} MB")
        if self.run_dir is not None and not self.skipped:
            path = self.run_dir / "timings.json"
            timings = json.loads(path.read_text()) if path.exists() else {}
            tree = max(self._tree.peak_mb, self._sampler.peak_mb)  # the tree sampler is slower: it may miss a peak
            timings[self.name] = {"seconds": self.seconds, "peak_rss_mb": self._sampler.peak_mb,
                                  "peak_tree_rss_mb": tree, "rows": self.rows, **self.extra}
            write_json(path, timings)
