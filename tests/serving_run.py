"""A small servable run directory: synthetic data, title and preference vectors from the real encoder, stored
preferences and an (untrained, seeded) SASRec `lane` checkpoint. Built by the serving tests' fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

CHECKPOINT = "lane"  # the name `lane run` gives it, the serving default
PREFERENCES = ["tense action thrillers", "gentle family comedies", "dark science fiction"]


def build_serving_run(run: Path, items: int = 80, users: int = 30) -> Path:
    import torch

    from lane_ray.config import SynthConfig, TrainConfig
    from lane_ray.data.synth import generate
    from lane_ray.io import read_parquet, write_parquet
    from lane_ray.models.recommender import save_checkpoint
    from lane_ray.pipeline.train import build_model
    from lane_ray.text import TextEncoder
    from lane_ray.train.features import load_features

    generate(SynthConfig(items=items, users=users, mean_session_len=8, seed=3), run)
    catalog = read_parquet(run / "data" / "catalog.parquet")
    user_ids = np.unique(read_parquet(run / "data" / "interactions.parquet")["user_id"].to_numpy())
    enc = TextEncoder(device="cpu", batch_size=64)

    def fixed(v: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float32).ravel()), v.shape[1])

    titles = catalog["title"].to_pylist()
    write_parquet(run / "item_embeddings.parquet", pa.table({
        "item_id": catalog["item_id"], "text_sha1": pa.array(["x"] * len(titles)),
        "embedding": fixed(enc.encode(titles))}))
    m = len(PREFERENCES)
    write_parquet(run / "preferences.parquet", pa.table({
        "user_id": pa.array(user_ids, pa.int64()), "preferences": pa.array([PREFERENCES] * len(user_ids)),
        "status": pa.array(["ok"] * len(user_ids))}))
    vecs = np.tile(enc.encode(PREFERENCES), (len(user_ids), 1))
    write_parquet(run / "preference_embeddings.parquet", pa.table({
        "user_id": pa.array(np.repeat(user_ids, m), pa.int64()),
        "slot": pa.array(np.tile(np.arange(m), len(user_ids)), pa.int64()),
        "text_sha1": pa.array(["x"] * (len(user_ids) * m)), "embedding": fixed(vecs)}))
    torch.manual_seed(0)
    tc = TrainConfig(variant="lane", hidden=16, layers=1, max_len=10)
    model = build_model(tc, load_features(run))
    save_checkpoint(model.eval(), run / "checkpoints" / CHECKPOINT, {"variant": "lane"})
    return run
