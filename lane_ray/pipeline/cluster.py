"""Connecting to (or starting) the Ray cluster a stage runs on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lane_ray.config import RayConfig
from lane_ray.errors import LaneError
from lane_ray.progress import log
from lane_ray.stage_metrics import enable as enable_stage_metrics

_STARTED_HERE = False  # whether init_ray started the local cluster this process is connected to


def init_ray(cfg: RayConfig) -> dict[str, Any]:
    """Initialise Ray once per process and return the cluster's resources.

    An already initialised Ray (a test fixture, a Ray job's driver) is used as it is. Otherwise connect to
    ``cfg.address`` or ``$RAY_ADDRESS``, or start a local cluster on 127.0.0.1 with the configured size.
    """
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            global _STARTED_HERE
            _STARTED_HERE = True
            if cfg.worker_niceness is not None:  # read by the raylet this process starts
                os.environ.setdefault("RAY_worker_niceness", str(cfg.worker_niceness))
            ray.init(
                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=cfg.include_dashboard,
                object_store_memory=cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None,
                _temp_dir=cfg.temp_dir, _node_ip_address="127.0.0.1", **kwargs,
            )
        res = ray.cluster_resources()
        log(f"ray: {'connected to ' + address if address else 'local cluster'} "
            f"({res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = cfg.data_progress_bars
    enable_stage_metrics(cfg.stage_metrics)
    return dict(ray.cluster_resources())


def _fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether every bundle fits on one node, first fit by decreasing size (what Ray's spread of actors and train
    workers needs; not an exact bin packing, which is NP-hard, but it never says yes wrongly)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        node = next((n for n in free if all(n.get(k, 0) >= v - 1e-9 for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _describe(bundles: list[dict[str, float]]) -> str:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0) + v
    shape = ", ".join(f"{v:g} {k}" for k, v in sorted(total.items()) if v)
    return shape + (f" ({len(bundles)} x {', '.join(f'{v:g} {k}' for k, v in bundles[0].items() if v)})"
                    if len(bundles) > 1 else "")


def wait_for_resources(bundles: list[dict[str, float]], what: str, cfg: RayConfig,
                       timeout_s: float | None = None) -> dict[str, float]:
    """Ask the autoscaler for ``bundles`` (``ray.autoscaler.sdk.request_resources``) and wait until the cluster's
    nodes can hold them, each bundle on one node, with a progress line every ``$LANE_PROGRESS_INTERVAL`` seconds
    ("waiting for 1 GPU: none in the cluster yet"); the cluster's resources then. Past the timeout
    (``timeout_s``, else ``cfg.resource_wait_s``, else 0 on a cluster :func:`init_ray` started and 600 s on one
    it connected to) a :class:`LaneError` names ``what`` and the missing resource. The nodes' total resources
    count, not what is free this moment: the stage's own tasks queue for the rest."""
    import time

    import ray

    from lane_ray.progress import progress_interval

    bundles = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    if timeout_s is None:
        timeout_s = cfg.resource_wait_s if cfg.resource_wait_s is not None else (0.0 if _STARTED_HERE else 600.0)
    if _fits(bundles, _alive_nodes()):
        return dict(ray.cluster_resources())
    from ray.autoscaler.sdk import request_resources

    t0 = time.monotonic()
    need = _describe(bundles)
    kinds = sorted({k for b in bundles for k in b})
    next_line = 0.0
    asked = False
    try:
        while True:
            nodes = _alive_nodes()
            if _fits(bundles, nodes):
                log(f"{what}: the cluster holds {need} now ({time.monotonic() - t0:.0f} s)")
                return dict(ray.cluster_resources())
            waited = time.monotonic() - t0
            have = ", ".join(f"{sum(n.get(k, 0) for n in nodes):g} {k}" for k in kinds)
            state = (f"the cluster has {have} on {len(nodes)} node(s)" if any(n.get(k, 0) for n in nodes for k in kinds)
                     else "none in the cluster yet")
            if waited >= timeout_s:
                raise LaneError(f"{what}: needs {need}; {state} after waiting {waited:.0f} s (ray.resource_wait_s); "
                                "add nodes that have it, or ask for less")
            if not asked:
                request_resources(bundles=bundles)  # a hint to the autoscaler; nothing without one
                asked = True
            if waited >= next_line:
                log(f"{what}: waiting for {need}: {state} ({waited:.0f} s of {timeout_s:g} s)")
                next_line = waited + progress_interval()
            time.sleep(min(1.0, max(0.05, timeout_s - waited)))
    finally:
        if asked:
            request_resources(bundles=[])  # the stage holds its nodes now; let the autoscaler forget the hint


def set_niceness(niceness: int | None) -> None:
    """Set this process's nice value (an actor doing a stage's real work calls it in its constructor).

    Ray workers run at nice 15; at that priority the driver, Ray's own processes and any other work on a
    small machine take the CPU from the actor (measured: 10-15 % for the encoder, ~4x for the LLM on a
    busy 2-core machine). Below 0 needs CAP_SYS_NICE; without it the actor keeps its nice value."""
    if niceness is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:
        pass


_GLIBC_DYNAMIC_MAX = 32 * 2**20  # the highest mmap threshold glibc's own adjustment reaches (64-bit)


@contextlib.contextmanager
def freed_memory_returned(threshold: int = 128 * 1024) -> Iterator[None]:
    """While inside, glibc hands large freed blocks back to the system at once (this process).

    glibc serves blocks above ``M_MMAP_THRESHOLD`` with their own mapping, returned on free, but raises that
    threshold (up to 32 MB) each time such a block is freed; after that, Arrow batches and numpy temporaries
    come from the heap and stay there once freed, so a driver streaming N rows grew with N (measured on the
    embedding planner: +29 MB from 100k to 1M rows, flat with the threshold fixed). Not for compute: there
    every large temporary becomes a fresh, zero-filled mapping (an encoder actor ran at less than half its
    speed), so on leaving, the threshold is set to the 32 MB glibc's adjustment would have reached anyway.
    A no-op elsewhere than glibc."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, threshold)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, _GLIBC_DYNAMIC_MAX)
