"""Ray Train and the experiment commands on tiny synthetic data in the session's local Ray cluster.

Preferences here are vectors the test writes (the LLM stage has its own tests); titles go through the real encoder
where a command embeds them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lane_ray.io import write_parquet

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")


def _vectors(n: int, dim: int, seed: int) -> pa.FixedSizeListArray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory: synthetic data (40 users, 60 items), title and preference vectors written here (dim 16)."""
    from lane_ray.config import SynthConfig
    from lane_ray.data.synth import generate
    from lane_ray.io import read_parquet

    run = tmp_path_factory.mktemp("run")
    generate(SynthConfig(items=60, users=40, mean_session_len=8, seed=1), run)
    items = read_parquet(run / "data" / "catalog.parquet")["item_id"]
    users = np.unique(read_parquet(run / "data" / "interactions.parquet")["user_id"].to_numpy())
    write_parquet(run / "item_embeddings.parquet", pa.table({
        "item_id": items, "text_sha1": pa.array(["x"] * len(items)), "embedding": _vectors(len(items), 16, 0)}))
    m = 3
    write_parquet(run / "preference_embeddings.parquet", pa.table({
        "user_id": pa.array(np.repeat(users, m), pa.int64()), "slot": pa.array(np.tile(np.arange(m), len(users)),
                                                                                pa.int64()),
        "text_sha1": pa.array(["x"] * (len(users) * m)), "embedding": _vectors(len(users) * m, 16, 1)}))
    return run


def _cfg(**train):
    from lane_ray.config import RayConfig, TrainConfig

    base = {"hidden": 16, "layers": 1, "max_len": 10, "epochs": 3, "patience": 5, "batch_size": 16,
            "cpus_per_worker": 1.0, "threads_per_worker": 1}
    return TrainConfig(**{**base, **train}), RayConfig()


def test_two_worker_ray_train_run_checkpoints_and_evaluates(ray_cluster, tiny_run):
    from lane_ray.models import load_checkpoint
    from lane_ray.pipeline.train import evaluate_model, train_variant
    from lane_ray.train.features import load_features

    feats = load_features(tiny_run)
    tc, rc = _cfg(variant="lane", num_workers=2)
    summary = train_variant(tc, rc, tiny_run, feats)
    assert summary["num_workers"] == 2
    assert [c["epoch"] for c in summary["curve"]] == [0, 1, 2]
    assert all(np.isfinite(c["loss"]) for c in summary["curve"])
    assert 0 <= summary["best_epoch"] <= 2
    model, meta = load_checkpoint(summary["checkpoint"])
    assert meta["variant"] == "lane" and model.cfg.align and model.cfg.pref_dim == 16
    curve_file = tiny_run / "curves" / "sasrec-lane-seed0.json"
    assert json.loads(curve_file.read_text())["epochs"] == 3
    result = evaluate_model(model, feats, tc, "lane", 0, faithfulness=True)
    for proto in ("full", "sampled100"):
        assert set(result[proto]) == {f"{m}@{k}" for m in ("ndcg", "hr", "mrr") for k in (5, 10, 20)}
        assert 0.0 <= result[proto]["ndcg@10"] <= result[proto]["hr@10"] <= 1.0
    # sampled-100 ranks among 101 items, full among 60: a random model cannot do worse on sampled100 than full
    assert result["faithfulness"]["users"] == 40
    assert 0.0 <= result["faithfulness"]["top_hurts_more"] <= 1.0
    check_candidates(model, feats, tiny_run)
    # lane evaluate rewrites them from the checkpoint (same model, same rows)
    from lane_ray.cli import main

    before = pq.read_table(tiny_run / "candidates.parquet")  # k = 5
    (tiny_run / "candidates.parquet").unlink()
    assert main(["evaluate", "--out", str(tiny_run), "--checkpoint", summary["checkpoint"], "-q"]) == 0
    after = pq.read_table(tiny_run / "candidates.parquet")
    assert after.num_rows == 40 * 10 and after.column_names == before.column_names
    top5 = after.filter(pc.less_equal(after["rank"], 5))
    assert top5["item_id"].to_pylist() == before["item_id"].to_pylist()
    assert np.allclose(np.concatenate(top5["pref_contrib"].to_pylist()),
                       np.concatenate(before["pref_contrib"].to_pylist()), atol=1e-6)


def check_candidates(model, feats, run: Path) -> None:
    """candidates.parquet, controls.parquet and calibration.json of write_candidates against recomputation from
    the checkpoint's model: one user's attributions by brute force (masking preferences, removing items)."""
    from lane_ray.pipeline.train import write_candidates

    assert write_candidates(model, feats, run / "candidates.parquet", k=5, history_top=2) == 40 * 5
    cands = pq.read_table(run / "candidates.parquet")
    for name, typ in (("pref_contrib", pa.list_(pa.float32())), ("pref_share", pa.float32()),
                      ("history_item_ids", pa.list_(pa.int64())), ("history_contrib", pa.list_(pa.float32())),
                      ("hit_rate", pa.float32())):
        assert cands.schema.field(name).type == typ
    calib = json.loads((run / "calibration.json").read_text())
    assert calib["users"] == 40 and sum(calib["counts"]) == 40 and calib["bins"][-1][1] == 60
    rates = dict(zip([tuple(b) for b in calib["bins"]], calib["rates"], strict=True))
    row = cands.filter(pc.equal(cands["user_id"], int(feats.split.user_ids[0]))).to_pylist()
    hist = torch.from_numpy(feats.histories(np.array([0]), "test", model.cfg.max_len))
    prefs = torch.from_numpy(feats.prefs[:1])
    mask = torch.from_numpy(feats.pref_mask[:1])
    items = torch.from_numpy(feats.index.encode(np.array([r["item_id"] for r in row])))[None]
    with torch.no_grad():
        base = model.score(hist, items, prefs, mask)[0]
        assert np.allclose([r["score"] for r in row], base.numpy(), atol=1e-5)
        for k in range(3):
            m2 = mask.clone()
            m2[0, k] = False
            want = (base - model.score(hist, items, prefs, m2)[0]).numpy()
            assert np.allclose([r["pref_contrib"][k] for r in row], want, atol=1e-5)
        share = (base - model.score(hist, items, prefs, torch.zeros_like(mask))[0]).numpy()
        assert np.allclose([r["pref_share"] for r in row], share, atol=1e-5)
        drops: dict[int, float] = {}  # the first candidate, every history item removed in turn
        for p in range(hist.shape[1]):
            if hist[0, p] > 0:
                h2 = torch.cat([torch.zeros(1, dtype=hist.dtype), hist[0, :p], hist[0, p + 1:]])[None]
                item = int(feats.index.decode(hist[0, p].numpy()))
                drops[item] = max(drops.get(item, -np.inf), float(base[0] - model.score(h2, items, prefs, mask)[0, 0]))
    best = sorted(drops.items(), key=lambda kv: -kv[1])[:2]
    assert row[0]["history_item_ids"] == [i for i, _ in best]
    assert np.allclose(row[0]["history_contrib"], [d for _, d in best], atol=1e-5)
    assert all(r["hit_rate"] == pytest.approx(rates[(r["rank"], r["rank"])]) for r in row)
    ctrl = pq.read_table(run / "controls.parquet")
    assert ctrl.schema == cands.schema and ctrl.num_rows == 40 * 3
    c = ctrl.filter(pc.equal(ctrl["user_id"], int(feats.split.user_ids[0]))).to_pylist()
    with torch.no_grad():
        full = model.full_scores(hist, prefs, mask)[0]
    full[hist[0]] = float("-inf")
    unseen = int(torch.isfinite(full).sum())
    for r in c:  # the true rank, in the lower half of the user's unseen items (a catalogue under 1,000)
        s = float(full[int(feats.index.encode(np.array([r["item_id"]]))[0])])
        assert r["rank"] == int((full > s).sum()) + 1 and r["rank"] > unseen // 2
        assert abs(r["score"] - s) < 1e-5 and len(r["pref_contrib"]) == 3


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tiny_run):
    from lane_ray.pipeline.train import train_variant
    from lane_ray.train.features import load_features

    feats = load_features(tiny_run, preferences=False)
    tc, rc = _cfg(variant="id", num_workers=1, epochs=4, max_failures=1, seed=3)
    calm = train_variant(tc, rc, tiny_run, feats)
    summary = train_variant(tc, rc, tiny_run, feats, fail_at_epoch=2)
    # the worker died after one batch of epoch 2; the restarted run resumed from the last checkpoint Ray Train had
    # registered (weights, optimizer, RNG; same batches by construction), so every epoch appears once and the run
    # ends exactly where the calm one did
    assert [c["epoch"] for c in summary["curve"]] == [0, 1, 2, 3]
    for a, b in zip(calm["curve"], summary["curve"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["valid"]["full"]["ndcg@10"] - b["valid"]["full"]["ndcg@10"]) < 1e-6
    assert calm["best_valid"] == summary["best_valid"]


def test_in_process_training_equals_one_ray_train_worker(ray_cluster, tiny_run):
    """`--workers 0` (this process) and one Ray Train worker run the same TrainingRun: same batches, history windows,
    dropout masks and early stopping, so the same curve and the same test metrics."""
    from lane_ray.models import load_checkpoint
    from lane_ray.pipeline.experiment import train_in_process
    from lane_ray.pipeline.train import evaluate_model, train_variant
    from lane_ray.train.features import load_features

    feats = load_features(tiny_run)
    tc, rc = _cfg(variant="lane", num_workers=1, epochs=4, patience=1, seed=7, dropout=0.3)
    local_model, local = train_in_process(tc, feats, tiny_run)
    ray_summary = train_variant(tc, rc, tiny_run, feats)
    ray_model, _ = load_checkpoint(ray_summary["checkpoint"])
    assert len(local["curve"]) == len(ray_summary["curve"]) >= 2
    for a, b in zip(local["curve"], ray_summary["curve"], strict=True):
        assert (a["epoch"], a["loss"], a["valid"]) == (b["epoch"], b["loss"], b["valid"])
    assert local["best_epoch"] == ray_summary["best_epoch"]
    ours, theirs = (evaluate_model(m, feats, tc, "lane", 7) for m in (local_model, ray_model))
    assert ours["full"] == theirs["full"] and ours["sampled100"] == theirs["sampled100"]


def test_corrupt_or_truncated_checkpoint_names_the_file(tmp_path, tiny_run):
    from lane_ray.errors import DataError
    from lane_ray.models import load_checkpoint
    from lane_ray.models.config import ModelConfig
    from lane_ray.models.recommender import SequentialRecommender, save_checkpoint

    model = SequentialRecommender(ModelConfig(num_items=60, hidden=16, layers=1, max_len=10))
    save_checkpoint(model, tmp_path / "ok", {"epoch": 1})
    load_checkpoint(tmp_path / "ok")
    for what, damage in (("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
                         ("garbage", lambda p: p.write_bytes(b"\x00garbage" * 10)),
                         ("empty", lambda p: p.write_bytes(b""))):
        for name in ("model.safetensors", "config.json"):
            d = tmp_path / f"{what}-{name}"
            save_checkpoint(model, d, {"epoch": 1})
            damage(d / name)
            with pytest.raises(DataError) as info:
                load_checkpoint(d)
            assert str(d / name) in str(info.value) and "\n" not in str(info.value)


def test_ray_train_matches_requested_resources(ray_cluster, tiny_run):
    from lane_ray.errors import LaneError
    from lane_ray.pipeline.train import train_variant
    from lane_ray.train.features import load_features

    feats = load_features(tiny_run, preferences=False)
    tc, rc = _cfg(variant="id", num_workers=3)
    with pytest.raises(LaneError, match=r"needs 3 CPU \(3 x 1 CPU\); the cluster has 2 CPU on 1 node\(s\) after "
                       r"waiting \d+ s \(ray.resource_wait_s\)"):
        train_variant(tc, rc.model_copy(update={"resource_wait_s": 1.0}), tiny_run, feats)


def test_cli_train_evaluate_and_ablation(ray_cluster, tmp_path, capsys):
    from lane_ray.cli import main

    src = tmp_path / "src"
    assert main(["data", "synth", "--items", "50", "--users", "30", "--out", str(src), "-q"]) == 0
    run = tmp_path / "run"
    small = ["--set", "train.hidden=16", "--set", "train.layers=1", "--set", "train.max_len=10",
             "--set", "train.threads_per_worker=1"]
    assert main(["train", "--dataset", str(src), "--out", str(run), "--variant", "id", "--epochs", "2",
                 "--workers", "1", "-q", *small]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sasrec/id/seed0"]["epochs"] == 2
    assert (run / "checkpoints" / "id" / "config.json").exists()
    assert main(["evaluate", "--out", str(run), "-q"]) == 0
    assert "sasrec/id/seed0: test ndcg@10 full" in capsys.readouterr().out

    assert main(["experiment", "ablation", "--dataset", str(src), "--out", str(run), "--backbones",
                 "gru4rec,bert4rec", "--variants", "id,title", "--seeds", "2", "--epochs", "1", "-q", *small]) == 0
    doc = json.loads((run / "metrics.json").read_text())
    keys = {f"{b}/{v}/seed{s}" for b in ("gru4rec", "bert4rec") for v in ("id", "title") for s in (0, 1)}
    assert keys <= set(doc)
    for k in keys:
        assert doc[k]["epochs"] == 1 and "ndcg@20" in doc[k]["sampled100"]
    table = (run / "ablation.md").read_text()
    assert "| gru4rec | title | 2 |" in table
    assert (run / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_variant_names_the_flag(tmp_path, capsys):
    from lane_ray.cli import main

    rc = main(["experiment", "ablation", "--out", str(tmp_path), "--variants", "id,bogus", "-q"])
    assert rc == 2
    assert "--variants: unknown variant 'bogus'" in capsys.readouterr().err
