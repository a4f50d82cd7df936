"""Cluster jobs: a ``lane`` command submitted to a Ray cluster's job server (``ray job submit``), its logs streamed
back as the job writes them (``JobSubmissionClient.tail_job_logs``), its final status returned:
``job_id = submit(["run", "--out", "s3://bucket/runs/x"], "http://head:8265"); wait(job_id, ...)``.

The working directory (and any ``--config`` file in it) travels in the job's ``runtime_env``; virtual
environments, run directories and caches stay behind (:data:`SUBMIT_EXCLUDES`). A ``runtime_env`` file (YAML or
JSON, as ``ray job submit --runtime-env`` takes it) adds to that: its ``env_vars`` override the forwarded ones, its
``excludes`` add to ours, its ``working_dir`` replaces ours. The entry point's own resources (``entrypoint_num_cpus``,
``entrypoint_num_gpus``, ``entrypoint_memory``, ``entrypoint_resources``) are those of ``ray job submit``: the
driver waits for a node that has them. The address is ``address``, else ``$RAY_ADDRESS``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lane_ray.errors import ConfigError

SUBMIT_EXCLUDES = [".venv/", ".git/", "runs/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/",
                   "/.dev*/", "/.whl/", "*.egg-info/"]
NOT_JOBS = ("submit", "serve")  # commands that are not batch jobs
FORWARDED_ENV = ("HF_HUB_OFFLINE", "LANE_MODEL_CACHE", "LANE_DATA_CACHE")


# `lane submit`'s options (flag, argparse keywords); those from --runtime-env on mirror `ray job submit`
SUBMIT_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--address", {"help": "the cluster's dashboard / job server, http://HOST:8265 (default: $RAY_ADDRESS)"}),
    ("--working-dir", {"default": ".", "help": "folder shipped to the cluster as the job's working directory "
                       "(default: here; .venv, .git, runs/ and caches are left out)"}),
    ("--job-id", {"help": "submission id (default: generated)"}),
    ("--no-wait", {"action": "store_true", "help": "print the job id and return without waiting"}),
    ("--timeout", {"type": float, "help": "seconds to wait for the job (default: no limit)"}),
    ("--runtime-env", {"metavar": "FILE", "help": "YAML or JSON file with the job's runtime_env (pip, env_vars, "
                       "excludes, working_dir, ...), merged with the working dir and environment lane ships"}),
    ("--entrypoint-num-cpus", {"type": float, "help": "CPUs reserved for the driver process (default: none)"}),
    ("--entrypoint-num-gpus", {"type": float, "help": "GPUs reserved for the driver process (default: none)"}),
    ("--entrypoint-memory", {"type": int, "help": "memory in bytes reserved for the driver process (default: none)"}),
    ("--entrypoint-resources", {"metavar": "JSON", "help": "custom resources reserved for the driver process, e.g. "
                                "'{\"head\": 1}'"}),
]


def load_runtime_env(path: str | Path) -> dict[str, Any]:
    """A ``runtime_env`` file (YAML, or JSON, which YAML reads too) as a dict; a one-line error naming the file."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the runtime_env file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not YAML or JSON ({str(exc).splitlines()[0]})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: a runtime_env is a mapping (pip, env_vars, ...), found a {type(doc).__name__}")
    for field, kind in (("env_vars", dict), ("excludes", list), ("working_dir", str)):
        if field in doc and not isinstance(doc[field], kind):
            raise ConfigError(f"{p}: field {field!r} must be a {kind.__name__}")
    return doc


def entrypoint_resources(text: str | None) -> dict[str, float] | None:
    """``--entrypoint-resources`` JSON as a dict of resource -> amount; a one-line error otherwise."""
    if text is None:
        return None
    import json

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--entrypoint-resources: not JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in doc.values()):
        raise ConfigError("--entrypoint-resources: give a JSON object of resource name -> amount, e.g. '{\"head\": 1}'")
    return {str(k): float(v) for k, v in doc.items()}


def job_runtime_env(working_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's ``runtime_env``: ``working_dir`` without :data:`SUBMIT_EXCLUDES`, the forwarded environment,
    then ``extra`` (a runtime_env file) on top."""
    extra = extra or {}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return {**extra, "working_dir": extra.get("working_dir", str(working_dir)),
            "excludes": SUBMIT_EXCLUDES + list(extra.get("excludes", [])),
            "env_vars": {**env, **extra.get("env_vars", {})}}


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
           job_id: str | None = None, runtime_env: dict[str, Any] | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           entrypoint_memory: int | None = None, entrypoint_resources: dict[str, float] | None = None) -> str:
    """Submit ``lane <command>`` (already checked by the caller's parser) to the cluster at ``address``, with
    ``runtime_env`` (see the module docstring) and the entry point's resources; the job id. :func:`wait` follows
    it."""
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
    entrypoint = "python -m lane_ray.cli " + shlex.join(command)
    resources = {k: v for k, v in (("entrypoint_num_cpus", entrypoint_num_cpus),
                                   ("entrypoint_num_gpus", entrypoint_num_gpus),
                                   ("entrypoint_memory", entrypoint_memory),
                                   ("entrypoint_resources", entrypoint_resources)) if v is not None}
    deadline = time.monotonic() + 120
    while True:  # a head that just started answers "no available agent" for a few seconds
        try:
            jid = client.submit_job(entrypoint=entrypoint, submission_id=job_id,
                                    runtime_env=job_runtime_env(wd, runtime_env), **resources)
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


__all__ = ["FORWARDED_ENV", "JobResult", "NOT_JOBS", "SUBMIT_EXCLUDES", "SUBMIT_OPTIONS", "entrypoint_resources",
           "job_address", "job_runtime_env", "load_runtime_env", "submit", "wait"]
