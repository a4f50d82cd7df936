"""Progress and resource accounting for stages: wall time, peak RSS (sampled) and row counts.

``with Stage("data", run_dir) as st: ...; st.rows = n`` prints start/finish lines to stderr and merges
``{"seconds", "peak_rss_mb", "peak_tree_rss_mb", "rows"}`` into ``<run_dir>/timings.json``: ``peak_rss_mb`` is
this process's, ``peak_tree_rss_mb`` that of this process and its children (with a local Ray cluster it started:
every Ray process of the node; see :class:`RssSampler`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from lane_ray.console import log
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


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def progress_interval() -> float:
    """Seconds between progress lines of a running stage (``$LANE_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.1, float(os.environ.get("LANE_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


class NewEntries:
    """Counts the rows of the ``part-*.parquet`` files that appeared in a folder since it was created (the atomic
    parts every Ray Data stage writes; a part is renamed into place whole, so a listed part is complete)."""

    def __init__(self, folder: str | Path, pattern: str = "part-*.parquet") -> None:
        from lane_ray.storage import remote_dir

        self.folder, self.pattern = Path(folder), pattern
        self.remote = remote_dir(folder)  # a run staged from s3:// / gs://: workers write there
        self._before = self._names()
        self._seen: dict[str, int] = {}

    def _names(self) -> set[str]:
        try:
            if self.remote is None:
                return {p.name for p in self.folder.glob(self.pattern)}
            import fnmatch

            import pyarrow.fs as pafs

            from lane_ray.storage import resolve_uri

            fs, root = resolve_uri(self.remote)
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            return {i.base_name for i in infos if fnmatch.fnmatch(i.base_name, self.pattern)}
        except OSError:
            return set()

    def _rows(self, name: str) -> int:
        import pyarrow.parquet as pq

        if self.remote is None:
            return pq.read_metadata(self.folder / name).num_rows
        from lane_ray.storage import join_uri, resolve_uri

        fs, path = resolve_uri(join_uri(self.remote, name))
        with fs.open_input_file(path) as fh:
            return pq.read_metadata(fh).num_rows

    def __call__(self) -> int:
        for name in self._names() - self._before - set(self._seen):
            try:
                self._seen[name] = self._rows(name)
            except (OSError, ValueError):  # removed by a compaction in between, or still being renamed
                continue
        return sum(self._seen.values())


class RunProgress:
    """One progress view over the stages of a pipeline run: which stage of how many is running, its own
    progress (rows, users, epochs) with rate and ETA, and the run's elapsed time, logged and kept in
    ``<run_dir>/progress.json`` (read by ``lane status RUN_DIR``, also while a cluster job runs).

    Used as a context manager around the run; :class:`Stage` objects entered meanwhile report into it."""

    def __init__(self, run_dir: str | Path, plan: list[str]) -> None:
        self.run_dir = Path(run_dir)
        self.plan = list(plan)
        self.states: dict[str, dict[str, Any]] = {n: {"name": n, "state": "pending"} for n in self.plan}
        self.started = time.time()
        self._lock = threading.Lock()
        self.state = "running"

    def __enter__(self) -> RunProgress:
        _RUNS.append(self)
        self.write()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        _RUNS.remove(self)
        self.state = "done" if et is None else ("interrupted" if et is KeyboardInterrupt else "failed")
        self.write()

    def position(self, name: str) -> str:
        if name in self.plan:
            return f"[{self.plan.index(name) + 1}/{len(self.plan)}] "
        return ""

    def update(self, name: str, **fields: Any) -> None:
        with self._lock:
            if name not in self.states:  # a stage outside the plan (an extra variant): shown after the plan
                self.plan.append(name)
                self.states[name] = {"name": name, "state": "pending"}
            self.states[name].update(fields)
        self.write()

    def write(self) -> None:
        with self._lock:
            doc = {"run_dir": str(self.run_dir), "state": self.state, "started_at": self.started,
                   "updated_at": time.time(), "elapsed_s": round(time.time() - self.started, 1),
                   "stages": [dict(self.states[n]) for n in self.plan]}
        try:
            write_json(self.run_dir / "progress.json", doc)
            from lane_ray.storage import push_file

            push_file(self.run_dir / "progress.json")  # a run on s3:// / gs:// shows its progress there too
        except OSError:  # the view is best-effort: never fail a run because it could not be written
            pass

    def elapsed(self) -> str:
        return _clock(time.time() - self.started)


_RUNS: list[RunProgress] = []
_STAGES: list[Stage] = []


def rates_path() -> Path:
    """Where stages keep the pace they reached on this machine (``$LANE_CACHE_DIR`` or ``~/.cache/lane_ray``)."""
    return Path(os.environ.get("LANE_CACHE_DIR") or Path.home() / ".cache" / "lane_ray") / "stage_rates.json"


# Units per second that a first run on a machine starts its estimate from: the default models on a 2-core CPU
# (docs/llm.md, docs/embedding.md). Keys are ``rate_key`` values of :func:`expect`.
DEFAULT_RATES = {
    "preferences/transformers/cpu": 1.5,
    "explanations/transformers/cpu": 0.6,
    "texts/embed": 700.0,
}


def llm_rate_key(stage: str, backend_kind: str, model_id: str, gpus: float) -> str:
    """The :func:`expect` ``rate_key`` of an LLM stage: a local model's pace depends on the device, a served
    model's on the server."""
    if backend_kind == "transformers":
        return f"{stage}/transformers/{'gpu' if gpus else 'cpu'}"
    return f"{stage}/{backend_kind}/{model_id}"


def _rates() -> dict[str, float]:
    try:
        doc = json.loads(rates_path().read_text())
        return {str(k): float(v) for k, v in doc.items() if float(v) > 0}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def estimate(key: str | None, total: int, unit: str) -> str | None:
    """How long ``total`` ``unit`` will roughly take, from the pace this machine's last run of the same kind
    reached (``rate_key``), else from :data:`DEFAULT_RATES`, and what the figure rests on; None without either."""
    rate, basis = None, ""
    if key:
        rate = _rates().get(key)
        basis = "the pace of this machine's last run"
        if rate is None and key in DEFAULT_RATES:
            rate, basis = DEFAULT_RATES[key], "the pace measured on a 2-core CPU"
    if not rate:
        return None
    per = f"{rate:,.2f} {unit}/s" if rate < 10 else f"{rate:,.0f} {unit}/s"
    return f"roughly {_clock(total / rate)} at {per} ({basis})"


def record_rate(key: str, rate: float) -> None:
    """Keep ``rate`` (units per second) as this machine's pace for ``key``; best effort."""
    rates = _rates()
    rates[key] = round(rate, 4)
    try:
        rates_path().parent.mkdir(parents=True, exist_ok=True)
        write_json(rates_path(), rates)
    except OSError:
        pass


def expect(total: int, counter: Any, unit: str, bound: Any = None, rate_key: str | None = None) -> None:
    """Tell the running :class:`Stage` (if any) how much work it has (``total`` ``unit``) and how to count what is
    done (``counter()``, e.g. a :class:`NewEntries`): it logs what it will do and roughly how long that takes
    (:func:`estimate` for ``rate_key``), then progress with rate and ETA every :func:`progress_interval` seconds,
    and keeps ``progress.json`` current; at its end it keeps the pace reached for ``rate_key``. ``bound()``,
    when given, returns ``(limit, why)``, the most ``unit`` the stage can still reach in all (training that
    stops early), or None: the ETA then runs to the limit. A no-op outside a Stage."""
    if _STAGES and total > 0:
        _STAGES[-1].watch(total, counter, unit, bound, rate_key)


def pace(done: int, total: int, seconds: float, unit: str, limit: tuple[int, str] | None = None) -> str:
    """The progress line of a stage: ``done`` of ``total`` ``unit`` after ``seconds``, its rate and ETA; with a
    ``limit`` below ``total`` (``(most units in all, why)``), the ETA runs to the limit and says why."""
    share = f"{done:,}/{total:,} {unit} ({100 * done / total:.1f}%)"
    if done == 0:
        return f"{share}, none finished after {_clock(seconds)}"
    rate = done / seconds if seconds > 0 else 0.0
    per = next((f"{rate * k:,.1f} {unit}/{u}" for k, u in ((1, "s"), (60, "min")) if rate * k >= 1),
               f"{rate * 3600:,.2f} {unit}/h")
    if done >= total or rate <= 0:
        return f"{share}, {per}"
    if limit is not None and done <= limit[0] < total:
        return f"{share}, {per}, ETA at most {_clock((limit[0] - done) / rate)} ({limit[1]})"
    return f"{share}, {per}, ETA {_clock((total - done) / rate)}"


class Stage:
    """Times a pipeline stage, samples its peak memory and records both in ``timings.json``; inside a
    :class:`RunProgress` it also reports its position, state and progress there."""

    def __init__(self, name: str, run_dir: str | Path | None = None, quiet: bool = False) -> None:
        self.name = name
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quiet = quiet
        self.rows: int | None = None
        self.skipped = False
        self.extra: dict[str, Any] = {}
        self._sampler = RssSampler()
        self._tree = RssSampler(interval=0.5, children=True)
        self._run = _RUNS[-1] if _RUNS else None
        self._prefix = self._run.position(name) if self._run else ""
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._pace: tuple[str | None, Any, float] | None = None  # (rate_key, counter, start) of the watched work

    def _log(self, msg: str) -> None:
        if not self.quiet:
            suffix = f" (run {self._run.elapsed()})" if self._run else ""
            log(f"{self._prefix}{self.name}: {msg}{suffix}")

    def __enter__(self) -> Stage:
        self._log("started")
        self._t0 = time.perf_counter()
        _STAGES.append(self)
        if self._run:
            self._run.update(self.name, state="running", started_at=time.time())
        self._sampler.__enter__()
        self._tree.__enter__()
        return self

    def watch(self, total: int, counter: Any, unit: str, bound: Any = None, rate_key: str | None = None) -> None:
        """Say what the stage will do and roughly how long it takes, then report ``counter()`` of ``total`` ``unit``
        every :func:`progress_interval` seconds until the stage ends (``bound``, ``rate_key``: see :func:`expect`)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        at_most = "at most " if bound is not None else ""
        rough = estimate(rate_key, total, unit)
        self._log(f"{at_most}{total:,} {unit} to do, " + (f"{at_most}{rough}" if rough else
                                                           "no earlier pace to estimate from yet"))
        self._pace = (rate_key, counter, time.perf_counter())
        self._stop = threading.Event()
        if self._run:
            self._run.update(self.name, done=0, total=total, unit=unit)
        self._ticker = threading.Thread(target=self._tick, args=(total, counter, unit, self._stop, bound),
                                        daemon=True)
        self._ticker.start()

    def _tick(self, total: int, counter: Any, unit: str, stop: threading.Event, bound: Any = None) -> None:
        t0 = time.perf_counter()
        while not stop.wait(progress_interval()):
            try:
                done = int(counter())
                limit = bound() if bound is not None else None
            except Exception:  # noqa: BLE001 - progress is best-effort; the stage itself reports real errors
                continue
            dt = time.perf_counter() - t0
            rate = done / dt if dt > 0 else 0.0
            self._log(pace(done, total, dt, unit, limit))
            if self._run:
                self._run.update(self.name, done=done, total=total, unit=unit, rate_per_s=round(rate, 2))

    @staticmethod
    def _keep_pace(key: str, counter: Any, t0: float) -> None:
        try:
            done = int(counter())
        except Exception:  # noqa: BLE001 - best effort, as the progress lines
            return
        seconds = time.perf_counter() - t0
        if done > 0 and seconds > 1.0:
            record_rate(key, done / seconds)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        _STAGES.remove(self)
        self._sampler.__exit__()
        self._tree.__exit__()
        self.seconds = round(time.perf_counter() - self._t0, 3)
        if et is None and self._pace is not None and self._pace[0]:
            self._keep_pace(*self._pace)
        tree = max(self._tree.peak_mb, self._sampler.peak_mb)  # the tree sampler is slower: it may miss a peak
        if et is not None:
            self._log(f"failed after {self.seconds:.1f}s")
            if self._run:
                self._run.update(self.name, state="interrupted" if et is KeyboardInterrupt else "failed",
                                 seconds=self.seconds, error=str(ev)[:300] if ev is not None else None)
            return
        what = "skipped (output is current)" if self.skipped else "done"
        rows = f", {self.rows:,} rows" if self.rows is not None else ""
        self._log(f"{what} in {self.seconds:.1f}s{rows}, peak RSS {self._sampler.peak_mb:.0f} MB")
        if self._run:
            self._run.update(self.name, state="skipped" if self.skipped else "done", seconds=self.seconds,
                             rows=self.rows)
        if self.run_dir is not None and not self.skipped:
            path = self.run_dir / "timings.json"
            timings = json.loads(path.read_text()) if path.exists() else {}
            timings[self.name] = {"seconds": self.seconds, "peak_rss_mb": self._sampler.peak_mb,
                                  "peak_tree_rss_mb": tree, "rows": self.rows, **self.extra}
            write_json(path, timings)
            from lane_ray.stage_metrics import record

            record(self.name, self.run_dir.name, self.seconds, self.rows)  # on the cluster's Prometheus endpoint
        from lane_ray.storage import push_all

        push_all()  # a run staged from s3:// / gs:// keeps the remote current after every finished stage


def read_progress(run_dir: str) -> dict[str, Any]:
    """The progress document of a run directory (``RUN/progress.json``, local or a URI); a one-line
    :class:`~lane_ray.errors.LaneError` when there is none or it is not one."""
    from lane_ray.errors import LaneError
    from lane_ray.storage import join_uri, read_text, redact

    path = join_uri(run_dir, "progress.json")
    try:
        doc = json.loads(read_text(path))
    except FileNotFoundError:
        raise LaneError(f"{redact(path)}: no progress file; is this a run directory of `lane run`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LaneError(f"{redact(path)}: not a progress file ({exc})") from None
    if not isinstance(doc, dict):
        raise LaneError(f"{redact(path)}: not a progress file (a JSON {type(doc).__name__})")
    return doc


def watch_progress(run_dir: str, every: float | None = None) -> Iterator[dict[str, Any]]:
    """The progress document of ``run_dir``: once, or again every ``every`` seconds while the run is running."""
    while True:
        doc = read_progress(run_dir)
        yield doc
        if not every or doc.get("state") != "running":
            return
        time.sleep(every)


def format_progress(doc: dict[str, Any]) -> str:
    """``progress.json`` as the table ``lane status`` prints."""
    lines = [f"{doc.get('run_dir')}: {doc.get('state')}, elapsed {_clock(doc.get('elapsed_s', 0))}"
             + ("" if doc.get("state") != "running" else
                f", last update {_clock(time.time() - doc.get('updated_at', time.time()))} ago")]
    for i, st in enumerate(doc.get("stages", []), 1):
        detail = ""
        if st.get("total"):
            done = st.get("done", 0)
            detail = f"{done:,}/{st['total']:,} {st.get('unit', '')} ({100 * done / st['total']:.0f}%)"
        if st.get("seconds") is not None:
            detail = (detail + ", " if detail else "") + f"{st['seconds']:.1f}s"
        if st.get("error"):
            detail += f": {st['error']}"
        lines.append(f"  {i:>2}. {st['name']:<24} {st.get('state', '?'):<11} {detail}".rstrip())
    return "\n".join(lines)
