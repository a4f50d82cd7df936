"""Cluster jobs: a ``lane`` command submitted to a Ray cluster's job server (``ray job submit``), its logs streamed
back as the job writes them (``JobSubmissionClient.tail_job_logs``), its final status returned:
``job_id = submit(["run", "--out", "s3://bucket/runs/x"], "http://head:8265"); wait(job_id, ...)``.

The working directory (and any ``--config`` file in it) travels in the job's ``runtime_env``; virtual
environments, run directories and caches stay behind (:data:`SUBMIT_EXCLUDES`). The address is ``address``, else
``$RAY_ADDRESS``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lane_ray.errors import ConfigError

SUBMIT_EXCLUDES = [".venv/", ".git/", "runs/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/",
                   "/.dev*/", "/.whl/", "*.egg-info/"]
NOT_JOBS = ("submit", "serve")  # commands that are not batch jobs
FORWARDED_ENV = ("HF_HUB_OFFLINE", "LANE_MODEL_CACHE", "LANE_DATA_CACHE")


@dataclass
class JobResult:
    """A submitted job: its id and, when it was waited for, its final status (``SUCCEEDED``, ``FAILED``, ...)."""

    job_id: str
    status: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def job_address(address: str | None) -> str:
    """``address``, else ``$RAY_ADDRESS``; a one-line error when neither is set."""
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise ConfigError("lane submit: no cluster address: give --address http://HEAD:8265 or set RAY_ADDRESS")
    return addr


def submit(command: list[str], address: str | None = None, working_dir: str | Path = ".",
           job_id: str | None = None) -> str:
    """Submit ``lane <command>`` (already checked by the caller's parser) to the cluster at ``address``; the job
    id. :func:`wait` follows it."""
    if not command:
        raise ConfigError("lane submit: give the lane command after --, e.g. lane submit --address URL -- run")
    if command[0] in NOT_JOBS:
        raise ConfigError(f"lane submit: `lane {command[0]}` is not a batch job (use serve/config.yaml with "
                          "`serve deploy` for the app)")
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise ConfigError(f"lane submit: --working-dir {wd} is not a folder")
    if "--config" in command:
        cfg = Path(command[command.index("--config") + 1]).resolve()
        if not cfg.is_relative_to(wd):
            raise ConfigError(f"lane submit: the config file {cfg} must be inside the working dir {wd} (it is "
                              "shipped with it); give its path relative to that folder")
    client = _client(address)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    entrypoint = "python -m lane_ray.cli " + shlex.join(command)
    deadline = time.monotonic() + 120
    while True:  # a head that just started answers "no available agent" for a few seconds
        try:
            jid = client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env={
                "working_dir": str(wd), "excludes": SUBMIT_EXCLUDES, "env_vars": env})
            break
        except RuntimeError as exc:
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise ConfigError(f"lane submit: the job server refused the job: {str(exc).splitlines()[0]}") from None
            time.sleep(2)
    return jid


def _client(address: str | None):
    addr = job_address(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(addr)
    except Exception as exc:  # noqa: BLE001 - connection, auth or version errors: one line
        raise ConfigError(f"lane submit: cannot reach the job server at {addr}: "
                          f"{str(exc).splitlines()[0]}") from None


def wait(job_id: str, address: str | None = None, timeout_s: float | None = None,
         logs: IO[str] | None = None) -> JobResult:
    """Stream the job's log lines to ``logs`` (stderr by default) as the job server pushes them, until the job
    ends; its final status. Past ``timeout_s`` the job is stopped, and that is a :class:`ConfigError`."""
    client = _client(address)
    logs = logs or sys.stderr

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            logs.write(lines)
            logs.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except TimeoutError:
        client.stop_job(job_id)
        raise ConfigError(f"lane submit: job {job_id} still running after {timeout_s:g} s; stopped it") from None
    terminal = {"SUCCEEDED", "FAILED", "STOPPED"}
    status = str(client.get_job_status(job_id).value)
    for _ in range(50):  # the log stream can close a moment before the status is final
        if status in terminal:
            break
        time.sleep(0.2)
        status = str(client.get_job_status(job_id).value)
    return JobResult(job_id, status)


__all__ = ["FORWARDED_ENV", "JobResult", "NOT_JOBS", "SUBMIT_EXCLUDES", "job_address", "submit", "wait"]
