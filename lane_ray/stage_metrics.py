"""Pipeline stages as Ray metrics: every finished stage's wall time and rows on the cluster's Prometheus endpoint
as three counters tagged with ``stage`` and ``run`` (the run directory's name): ``ray_lane_stage_seconds_total``,
``ray_lane_stage_rows_total`` and ``ray_lane_stage_runs_total``. Counters, because they persist: Ray exports a
gauge only for a collection interval or two after it is set, and a histogram's ``_sum`` is rebuilt from bucket
midpoints (100 s reads as 180 s), so neither states a stage's wall time reliably.

The metrics live in one small actor per cluster (``lane_stage_metrics`` in namespace ``lane``, detached, no CPU):
a driver's own metrics vanish from the endpoint when the driver exits, usually before Prometheus scrapes them,
while the actor keeps every series as long as the cluster lives. Stages that finish before this
process joins Ray (the data stage of a run) are held here and sent when :func:`enable` is called.
``ray.stage_metrics: false`` turns it off. Metrics are best effort: a stage never fails because of them.
"""

from __future__ import annotations

import sys
from typing import Any

ACTOR_NAME = "lane_stage_metrics"
NAMESPACE = "lane"

_state: dict[str, Any] = {"enabled": None, "actor": None}  # enabled: None until this process joins Ray
_pending: list[tuple[str, str, float, int]] = []


class StageMetrics:
    """The actor that holds the stage metrics (created by :func:`record` on first use)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter

        keys = ("stage", "run")
        self.seconds = Counter("lane_stage_seconds", description="Wall time of finished pipeline stages, in "
                               "seconds.", tag_keys=keys)
        self.runs = Counter("lane_stage_runs", description="Finished runs of pipeline stages.", tag_keys=keys)
        self.rows = Counter("lane_stage_rows", description="Rows written by finished pipeline stages.",
                            tag_keys=keys)

    def record(self, stage: str, run: str, seconds: float, rows: int) -> None:
        tags = {"stage": stage, "run": run}
        self.runs.inc(1, tags=tags)
        if seconds > 0:
            self.seconds.inc(seconds, tags=tags)
        if rows > 0:
            self.rows.inc(rows, tags=tags)


def _actor() -> Any:
    import ray

    if _state["actor"] is None:
        cls = ray.remote(num_cpus=0, max_restarts=-1)(StageMetrics)
        _state["actor"] = cls.options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached",
                                      get_if_exists=True).remote()
    return _state["actor"]


def _flush() -> None:
    ray = sys.modules.get("ray")  # never imported here: a process that has not loaded Ray is not connected
    if not _pending or _state["enabled"] is not True or ray is None or not ray.is_initialized():
        return
    batch = list(_pending)
    _pending.clear()
    try:
        actor = _actor()
        ray.get([actor.record.remote(*row) for row in batch], timeout=30)
    except Exception as exc:  # noqa: BLE001 - best effort: say so once, never fail the stage
        _state["enabled"] = False
        print(f"[lane] stage metrics off for this process: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)


def record(stage: str, run: str, seconds: float, rows: int | None) -> None:
    """Record one finished stage: sent at once when this process is connected to Ray, else when it connects."""
    if _state["enabled"] is False:
        return
    _pending.append((stage, run, float(seconds), int(rows or 0)))
    _flush()


def enable(on: bool) -> None:
    """Called when this process has joined a Ray cluster: send what is held (``on``) or drop it for good."""
    _state["enabled"] = bool(on)
    if not on:
        _pending.clear()
    _flush()
