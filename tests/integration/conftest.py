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
