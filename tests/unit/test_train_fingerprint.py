"""The training fingerprint that lets `lane run` skip a current variant."""

from __future__ import annotations

import json
import os

from lane_ray.config import TrainConfig
from lane_ray.pipeline.train import training_fingerprint


def _run(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("interactions", "catalog"):
        (tmp_path / "data" / f"{name}.parquet").write_bytes(b"PAR1" + name.encode())
    emb = tmp_path / "item_embeddings.parquet"
    emb.mkdir()
    (emb / "part-0.parquet").write_bytes(b"PAR1x")
    (emb / "_manifest.json").write_text(json.dumps({"seconds": 1.0}))
    return tmp_path


def test_fingerprint_follows_settings_and_inputs_not_compute_or_manifests(tmp_path):
    run = _run(tmp_path)
    tc = TrainConfig(variant="title")
    fp = training_fingerprint(tc, run)
    assert training_fingerprint(tc, run) == fp
    # compute layout and run timings in manifests do not matter
    assert training_fingerprint(tc.model_copy(update={"num_workers": 2, "threads_per_worker": 1}), run) == fp
    (run / "item_embeddings.parquet" / "_manifest.json").write_text(json.dumps({"seconds": 2.0}))
    assert training_fingerprint(tc, run) == fp
    # settings and the embeddings do
    assert training_fingerprint(tc.model_copy(update={"lr": 0.01}), run) != fp
    part = run / "item_embeddings.parquet" / "part-0.parquet"
    part.write_bytes(b"PAR1xy")
    assert training_fingerprint(tc, run) != fp
    # the id variant does not read the title embeddings
    fid = training_fingerprint(TrainConfig(variant="id"), run)
    os.utime(part, ns=(1, 1))
    assert training_fingerprint(TrainConfig(variant="id"), run) == fid
