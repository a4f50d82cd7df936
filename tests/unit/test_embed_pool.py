"""The embedding stage's actor layout (``actor_pool``): a pure function of the config and the cluster's resources."""

from __future__ import annotations

import math

import pytest

from lane_ray.config import EmbedConfig
from lane_ray.errors import ConfigError
from lane_ray.pipeline.embed import actor_pool, block_plan

CPU = EmbedConfig(device="cpu")


@pytest.mark.parametrize("cpus", [2, 4, 16])
def test_cpu_default_is_one_single_threaded_actor_per_core_with_one_cpu_left_for_reading(cpus):
    pool = actor_pool(CPU, {"CPU": cpus})
    assert (pool["max"], pool["threads"], pool["device"], pool["tokenizers"]) == (cpus, 1, "cpu", 0)
    # the actors' logical CPUs leave exactly one free for the read/select tasks
    assert pool["max"] * pool["num_cpus"] == pytest.approx(cpus - 1, abs=1e-3)


def test_multi_node_keeps_one_cpu_free_on_the_smallest_node():
    pool = actor_pool(CPU, {"CPU": 32}, node_cpus=[16, 16])
    assert pool["max"] == 32 and pool["num_cpus"] == pytest.approx(15 / 16)
    pool = actor_pool(CPU, {"CPU": 20}, node_cpus=[4, 16])
    assert pool["num_cpus"] == pytest.approx(3 / 4)  # a 4-CPU node fits 4 actors and one read task


def test_one_cpu_nodes_leave_a_cpu_of_the_cluster_for_reading():
    pool = actor_pool(CPU, {"CPU": 3}, node_cpus=[1, 1, 1])  # each actor takes a whole node: one node stays free
    assert (pool["max"], pool["num_cpus"]) == (2, 1.0)


def test_cpu_threads_and_explicit_settings():
    pool = actor_pool(CPU.model_copy(update={"threads_per_actor": 2}), {"CPU": 8})
    assert (pool["max"], pool["threads"]) == (4, 2) and 4 * pool["num_cpus"] == pytest.approx(7, abs=1e-3)
    pool = actor_pool(CPU.model_copy(update={"threads_per_actor": 2, "max_actors": 1}), {"CPU": 2})
    assert (pool["max"], pool["threads"], pool["num_cpus"]) == (1, 2, 1.0)  # the one-actor layout, by config
    pool = actor_pool(CPU.model_copy(update={"cpus_per_actor": 0.25, "max_actors": 3}), {"CPU": 2})
    assert (pool["max"], pool["num_cpus"]) == (3, 0.25)


def test_one_cpu_cluster_still_gets_an_actor():
    pool = actor_pool(CPU, {"CPU": 1})
    assert (pool["max"], pool["threads"], pool["num_cpus"]) == (1, 1, 1.0)


def test_gpu_layout_one_actor_per_gpu_with_tokenizers_on_the_spare_cpus():
    pool = actor_pool(EmbedConfig(), {"CPU": 16, "GPU": 2})
    assert (pool["use_gpu"], pool["max"], pool["num_gpus"], pool["num_cpus"]) == (True, 2, 1.0, 1.0)
    assert pool["tokenizers"] == 13  # 16 CPUs - 2 encoder actors - 1 for reading and writing


def test_cpu_tokenizer_stage_shares_the_cores_or_is_refused():
    cfg = CPU.model_copy(update={"tokenize_stage": True})
    pool = actor_pool(cfg, {"CPU": 4})
    assert (pool["tokenizers"], pool["max"]) == (1, 3)  # one tokenizer CPU, three encoder cores
    assert pool["max"] * pool["num_cpus"] + 1 == pytest.approx(3, abs=1e-3)  # and one CPU for reading
    with pytest.raises(ConfigError, match="tokenizer actor.*tokenize_stage=false"):
        actor_pool(cfg, {"CPU": 2})


def test_never_more_actors_than_blocks_and_the_whole_pool_starts_at_once():
    pool = actor_pool(CPU, {"CPU": 16}, todo=3 * 4096 + 1)
    assert (pool["max"], pool["min"]) == (4, 4)
    assert pool["threads"] == 4  # fewer actors than cores: they share the cores out
    pool = actor_pool(CPU, {"CPU": 2}, todo=1682)  # ml-100k's titles: one block
    assert (pool["max"], pool["min"], pool["threads"]) == (1, 1, 2)
    pool = actor_pool(CPU.model_copy(update={"threads_per_actor": 1, "min_actors": 1}), {"CPU": 8}, todo=10**6)
    assert (pool["max"], pool["min"], pool["threads"]) == (8, 1, 1)
    assert actor_pool(EmbedConfig(), {"CPU": 16, "GPU": 4}, todo=100)["max"] == 1


@pytest.mark.parametrize(("rows", "todo", "actors"), [(200_000, 200_000, 2), (30_000, 30_000, 2), (1682, 1682, 1),
                                                       (1_000_000, 1_000_000, 15), (50_000, 700, 2), (10, 0, 2),
                                                       (37 * 4096, 37 * 4096, 1), (100_003, 100_003, 3)])
def test_blocks_are_balanced_across_the_actors(rows, todo, actors):
    cfg = EmbedConfig(rows_per_batch=4096, rows_per_block=20_000)
    batch_rows, read_blocks = block_plan(rows, todo, actors, cfg)
    assert 1 <= batch_rows <= 4096 and read_blocks >= 1
    batches = math.ceil(todo / batch_rows) if todo else 0
    if todo >= 4096 * actors:
        assert batches % actors == 0  # every actor gets the same number of batches...
        assert batches * batch_rows - todo < batches  # ...of (nearly) equal size
    if todo == rows and todo:
        assert read_blocks <= batches and batches % read_blocks == 0  # whole batches per read block
