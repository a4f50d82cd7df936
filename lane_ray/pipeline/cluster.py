"""Connecting to (or starting) the Ray cluster a stage runs on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lane_ray.config import RayConfig
from lane_ray.progress import log


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
    return dict(ray.cluster_resources())


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
