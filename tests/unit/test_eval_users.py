"""Evaluation on a fixed user sample (train.eval_users): the same users for every call, and the metrics of exactly
those users."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_eval_rows_is_a_fixed_sorted_sample():
    from lane_ray.train.loop import eval_rows

    assert eval_rows(100, None) is None and eval_rows(100, 100) is None and eval_rows(100, 500) is None
    a, b = eval_rows(1000, 50), eval_rows(1000, 50)
    assert np.array_equal(a, b) and a.size == 50 and np.all(np.diff(a) > 0) and a.max() < 1000


def test_evaluate_on_a_sample_is_the_metric_of_those_users(tmp_path):
    from lane_ray.config import SynthConfig
    from lane_ray.data.synth import generate
    from lane_ray.models import SequentialRecommender
    from lane_ray.train.features import load_features
    from lane_ray.train.loop import eval_rows, evaluate, model_config

    generate(SynthConfig(items=50, users=60, mean_session_len=6, seed=2), tmp_path)
    feats = load_features(tmp_path, titles=False, preferences=False)
    torch.manual_seed(0)
    model = SequentialRecommender(model_config("id", feats.num_items, "sasrec", hidden=16, layers=1, max_len=10))
    rows = eval_rows(feats.split.num_users, 20)
    sample = evaluate(model, feats, "test", ("full",), 7, users=rows)
    # the same users one at a time: the per-user metric averaged over the sample
    singles = [evaluate(model, feats, "test", ("full",), 7, users=np.array([r]))["full"]["ndcg@10"] for r in rows]
    assert sample["full"]["ndcg@10"] == pytest.approx(float(np.mean(singles)), abs=1e-9)
    assert evaluate(model, feats, "test", ("full",), 7) != sample  # all users differ from the sample
