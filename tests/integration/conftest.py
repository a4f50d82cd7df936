"""Session fixtures: one local Ray cluster (2 CPUs, a modest object store, its own temp dir), the packaged LLM,
and one finished pipeline run that several tests read."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    if ray.is_initialized():  # someone else's cluster: use it, never stop it
        yield ray.get_runtime_context().gcs_address
        return
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def llm():
    """The packaged SmolLM2 through the transformers backend, loaded once per test session (~20 s) with one
    torch thread, so a shared test machine is not oversubscribed; the thread count is restored after."""
    torch = pytest.importorskip("torch")
    from lane_ray.llm.transformers_backend import LLMNotFoundError, TransformersBackend

    threads = torch.get_num_threads()
    try:
        yield TransformersBackend(num_threads=1)
    except LLMNotFoundError as exc:
        pytest.skip(str(exc))
    finally:
        torch.set_num_threads(threads)


# `lane run` on the tiny MovieLens copy of tests/conftest.py: two training epochs on one thread, one explanation.
PIPELINE_ARGS = ("--set", "train.epochs=2", "--set", "train.threads_per_worker=1", "--set", "run.explain_users=1",
                 "--set", "explain.top_k=1")


@dataclass(frozen=True)
class PipelineRun:
    """One finished ``lane run`` and what it printed. ``metrics`` is read when the run ends: a test may go on
    to change the run directory (test_run.py redoes stages in it), the snapshot stays as it was."""

    dataset: Path
    out: Path
    rc: int
    stdout: str
    stderr: str
    metrics: dict

    def args(self, *extra: str) -> list[str]:
        """The ``lane run`` arguments of this run (without ``--out``), then ``extra``."""
        return pipeline_args(self.dataset, *extra)


def pipeline_args(dataset: Path, *extra: str) -> list[str]:
    return ["run", "--dataset", str(dataset), *PIPELINE_ARGS, *extra]


@pytest.fixture(scope="session")
def pipeline_run(ray_cluster, tmp_path_factory) -> PipelineRun:
    """The whole pipeline, once per session, on the session's cluster: test_run.py checks its stages and skip
    rules, test_submit.py that a submitted job and test_multinode.py that a run on three nodes give the same
    metrics (one local run for all: ~2 minutes)."""
    from lane_ray.cli import main
    from tests.conftest import write_ml100k

    base = tmp_path_factory.mktemp("pipeline")
    dataset, run_dir = write_ml100k(base / "ml-100k"), base / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*pipeline_args(dataset), "--out", str(run_dir)])
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return PipelineRun(dataset, run_dir, rc, out.getvalue(), err.getvalue(), metrics)
