"""One local Ray cluster for the whole test session (2 CPUs, a modest object store, its own temp dir)."""

from __future__ import annotations

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
