"""Client of the multi-node test cluster (tests/multinode_cluster.py): start it, add and kill nodes, find where a
stage's actors run, and stop it (only its own processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class MultiNodeCluster:
    """A head with ``head_cpus`` CPUs (custom resource ``head``) and the nodes :meth:`add` starts. ``env`` is the
    environment for a driver subprocess of this cluster (``RAY_ADDRESS`` is its GCS address)."""

    def __init__(self, head_cpus: float = 1) -> None:
        # Ray's session folder holds Unix sockets, whose paths must stay under 108 bytes: a short folder of its own
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lane-mn-"))
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "multinode_cluster.py"), str(head_cpus),
                                      str(self.temp_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=self._env(), cwd=ROOT)
        head = self._answer(timeout_s=180)
        self.gcs, self.dashboard = head["gcs"], head["dashboard"]
        self.node_ids = {"head": head["node_id"]}
        self.env = {**self._env(), "RAY_ADDRESS": self.gcs}

    @staticmethod
    def _env() -> dict[str, str]:
        """This interpreter's environment first on PATH: job entry points (`python -m ...`) and workers use it."""
        return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}

    def _answer(self, timeout_s: float = 120) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the test cluster exited ({self.proc.poll()})")
            if line.startswith("{"):
                doc = json.loads(line)
                if doc.get("ok") is False:
                    raise RuntimeError(doc["error"])
                return doc
        raise TimeoutError("the test cluster did not answer")

    def _send(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def add(self, name: str, cpus: float = 1, gpus: float = 0) -> str:
        """Start node ``name`` (custom resource ``{name: 1}``); its node id."""
        self.node_ids[name] = self._send(f"add {name} {cpus:g} {gpus:g}")["node_id"]
        return self.node_ids[name]

    def kill(self, name: str) -> None:
        """SIGKILL every process of node ``name``: its raylet, object store and workers."""
        self._send(f"kill {name}")
        self.node_ids.pop(name)

    def name_of(self, node_id: str) -> str:
        return next(n for n, i in self.node_ids.items() if i == node_id)

    def actor_nodes(self, class_name: str) -> list[str]:
        """The names of the nodes where live actors of ``class_name`` run (Ray's state API on this cluster)."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000,
                             raise_on_missing_output=False)
        return sorted({self.name_of(a.node_id) for a in actors if class_name in (a.class_name or "")
                       and a.node_id in self.node_ids.values()})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send("quit")
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
