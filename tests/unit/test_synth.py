from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lane_ray.config import DataConfig, SynthConfig
from lane_ray.data import load_dataset
from lane_ray.data.synth import GENRES, ZipfGenreSampler, generate


def test_generate_is_deterministic_and_canonical(tmp_path):
    cfg = SynthConfig(items=3000, users=200, seed=4, chunk_items=1000, chunk_users=100)
    s1 = generate(cfg, tmp_path / "a")
    s2 = generate(cfg, tmp_path / "b")
    for name in ("catalog.parquet", "interactions.parquet"):
        assert pq.read_table(tmp_path / "a" / "data" / name).equals(pq.read_table(tmp_path / "b" / "data" / name))
    assert s1 == s2
    cat = pq.read_table(tmp_path / "a" / "data" / "catalog.parquet")
    assert cat["item_id"].to_pylist() == list(range(1, 3001))
    titles = cat["title"].to_pylist()
    assert all(len(t.split()) >= 2 for t in titles)  # multi-word titles
    assert len(set(titles)) / len(titles) > 0.9
    inter = pq.read_table(tmp_path / "a" / "data" / "interactions.parquet")
    assert inter.num_rows == s1["interactions"]
    lengths = np.unique(inter["user_id"].to_numpy(), return_counts=True)[1]
    assert lengths.size == 200 and lengths.min() >= cfg.min_session_len
    assert 10 < lengths.mean() < 35
    # a generated run directory loads as a Parquet dataset and survives leave-one-out preprocessing
    p = load_dataset(DataConfig(dataset=str(tmp_path / "a")))
    assert p.stats()["users"] == 200 and p.report["duplicate_interactions"] == 0
    # timestamps strictly increase within a user
    u, t = inter["user_id"].to_numpy(), inter["timestamp"].to_numpy()
    same = u[1:] == u[:-1]
    assert (t[1:][same] > t[:-1][same]).all()


def test_popularity_is_skewed_and_sessions_are_genre_coherent(tmp_path):
    cfg = SynthConfig(items=2000, users=400, genres=10, seed=1, genre_coherence=0.9)
    generate(cfg, tmp_path)
    inter = pq.read_table(tmp_path / "data" / "interactions.parquet")
    counts = np.sort(np.unique(inter["item_id"].to_numpy(), return_counts=True)[1])[::-1]
    top = counts[: max(1, counts.size // 100)].sum() / counts.sum()
    assert top > 0.05  # the top 1 % of items take well over 1 % of interactions (Zipf head)
    genre = (inter["item_id"].to_numpy() - 1) % 10
    users = inter["user_id"].to_numpy()
    share = []
    for u in np.unique(users):
        g = np.bincount(genre[users == u], minlength=10)
        share.append(np.sort(g)[-2:].sum() / g.sum())
    assert np.mean(share) > 0.75  # most of a user's items come from two genres
    cat = pq.read_table(tmp_path / "data" / "catalog.parquet")
    first_genre = pc.split_pattern(cat["genres"], "|").to_pylist()
    assert all(g[0] == GENRES[(i - 1) % 10] for i, g in zip(cat["item_id"].to_pylist(), first_genre, strict=True))


def test_zipf_sampler_stays_in_genre_and_range():
    s = ZipfGenreSampler(num_items=1001, num_genres=7, a=1.2, seed=0)
    rng = np.random.default_rng(0)
    genres = rng.integers(7, size=5000)
    items = s.sample(genres, rng)
    assert items.min() >= 1 and items.max() <= 1001
    assert ((items - 1) % 7 == genres).all()
