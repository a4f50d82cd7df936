"""The ANN index: built from a checkpoint's item table, checked against its weights, and giving the serving core
the same top-k as exact scoring on a small catalogue."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.serving_run import CHECKPOINT

pytest.importorskip("faiss")
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_core_matches_exact_top_k(serving_run, kind, tmp_path):
    from lane_ray.cli import main
    from lane_ray.serving import RankerCore, RankQuery

    out = tmp_path / kind
    args = ["index", "--run", str(serving_run), "--checkpoint", CHECKPOINT, "--kind", kind, "--index-out", str(out)]
    assert main(args + (["--nlist", "4"] if kind == "ivf" else [])) == 0
    exact = RankerCore(serving_run, CHECKPOINT)
    approx = RankerCore(serving_run, CHECKPOINT, ann_index=str(out), ann_nprobe=4)
    assert approx.ann is not None and approx.ann.meta["items"] == len(exact.index)
    queries = []
    for uid in exact.split.user_ids[:10]:
        u = exact.user(int(uid))
        queries.append(RankQuery(u.history, 10, u.prefs))
    for q, e, a in zip(queries, exact.score(queries), approx.score(queries), strict=True):
        assert a["items"] == e["items"] and np.allclose(a["scores"], e["scores"], atol=1e-5)
        assert len(a["items"]) == 10 and not set(a["items"]) & set(q.history)
        for x, y in zip(a["attribution"], e["attribution"], strict=True):  # the same attribution on both paths
            assert np.allclose(x["pref_contrib"], y["pref_contrib"], atol=1e-5) and x["evidence"] == y["evidence"]
    # a target asks for an exact rank: the exact path answers it
    q = RankQuery(queries[0].history, 3, queries[0].prefs, target=5)
    assert approx.score([q])[0]["target"] == exact.score([q])[0]["target"]


def test_stale_or_missing_index_is_refused(serving_run, tmp_path):
    from lane_ray.errors import DataError
    from lane_ray.index import build_for_checkpoint
    from lane_ray.models.recommender import load_checkpoint, save_checkpoint
    from lane_ray.serving import RankerCore

    with pytest.raises(DataError, match="no ANN index here"):
        RankerCore(serving_run, CHECKPOINT, ann_index=str(tmp_path / "none"))
    ckpt = serving_run / "checkpoints" / CHECKPOINT
    build_for_checkpoint(ckpt, tmp_path / "idx", "hnsw")
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    model, meta = load_checkpoint(other)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(model, other, meta)
    with pytest.raises(DataError, match="built for other weights"):
        RankerCore(serving_run, str(other), ann_index=str(tmp_path / "idx"))
