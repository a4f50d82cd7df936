"""Ray Train: one variant of the recommender trained with ``TorchTrainer`` (DDP), data sharded through Ray Data.

The worker loop is thin: it takes its shard of user rows (``ray.train.get_dataset_shard``), wraps the pure torch
model with ``prepare_model`` (DDP), runs the pure epoch functions of :mod:`lane_ray.train.loop`, and on rank 0
evaluates validation NDCG@10, keeps the best weights and reports a checkpoint every epoch. The stop decision is
broadcast so every worker leaves the loop together. ``FailureConfig`` restarts the workers after a failure and the
loop resumes from the last reported checkpoint (weights, optimizer, epoch, best so far, curve).

Launch (local cluster or ``RAY_ADDRESS``)::

    lane train --out runs/default --set train.backbone=sasrec --set train.variant=lane --set train.num_workers=2
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lane_ray.atomic import publish
from lane_ray.config import RayConfig, TrainConfig
from lane_ray.errors import LaneError
from lane_ray.progress import log


def arch_kwargs(tc: TrainConfig) -> dict[str, Any]:
    return {"hidden": tc.hidden, "layers": tc.layers, "heads": tc.heads, "dropout": tc.dropout,
            "max_len": tc.max_len, "align_heads": tc.align_heads, "align_dropout": tc.align_dropout,
            "finetune_titles": tc.finetune_titles, "sparse_items": tc.sparse_items}


def build_model(tc: TrainConfig, feats):
    """A fresh model for ``tc.variant`` sized from the features."""
    import torch

    from lane_ray.models import SequentialRecommender
    from lane_ray.train.loop import model_config

    dims = {}
    if feats.titles is not None:
        dims["title_dim"] = int(feats.titles.shape[1])
    if feats.prefs is not None:
        dims["pref_dim"] = int(feats.prefs.shape[2])
    cfg = model_config(tc.variant, feats.num_items, tc.backbone, **arch_kwargs(tc), **dims)
    titles = torch.from_numpy(feats.titles) if cfg.item_mode == "title" else None
    return SequentialRecommender(cfg, titles)


def run_name(tc: TrainConfig) -> str:
    """``<backbone>-<variant>-seed<k>``: the name of a training run (Ray Train run, curve file)."""
    return f"{tc.backbone}-{tc.variant}-seed{tc.seed}"


class EpochProgress:
    """A training run's progress, read from its newest Ray Train checkpoint in ``folder`` (Ray Train keeps only the
    newest two, so counting checkpoint folders misses epochs): ``()`` is the epochs finished since this object
    was made, :meth:`bound` the most epochs the run can reach (its best epoch plus ``patience``, capped at
    ``epochs``) with why, for the progress ETA (:func:`lane_ray.progress.expect`). Nothing is known before the
    first checkpoint or where the folder cannot be read (a run on S3/GCS): 0 and None."""

    def __init__(self, folder: str | Path, patience: int, epochs: int) -> None:
        self.folder, self.patience, self.epochs = Path(folder), patience, epochs
        self._state = self._newest()  # the last read: bound() uses the one each count made
        self.base = self._state[0] if self._state else 0  # a resumed run: what was done before counts for neither

    def _newest(self) -> tuple[int, int] | None:
        """(epochs finished, best epoch, 0-based) of the newest checkpoint that is whole."""
        import json

        try:
            names = sorted(p.name for p in self.folder.glob("checkpoint_*"))  # named by time: newest last
        except OSError:
            return None
        for name in reversed(names):
            try:
                done = json.loads((self.folder / name / "model" / "config.json").read_text())["meta"]["epochs_done"]
                best = json.loads((self.folder / name / "best" / "config.json").read_text())["meta"]["epoch"]
                return int(done), int(best)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # still being written
        return None

    def __call__(self) -> int:
        self._state = self._newest()
        return max(0, self._state[0] - self.base) if self._state else 0

    def bound(self) -> tuple[int, str] | None:
        """The early-stopping limit as of the last count (the progress tick counts first, then asks)."""
        state = self._state
        if state is None:
            return None
        limit = min(self.epochs, state[1] + 1 + self.patience)
        return limit - self.base, (f"early stopping: best validation NDCG@10 at epoch {state[1] + 1}, stops after "
                                   f"epoch {limit} unless it improves")


def finish_run(run_dir: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Add ``seconds_per_epoch`` to a fit summary and write it to ``run_dir/curves/<name>.json``."""
    from lane_ray.io import write_json

    curve = summary["curve"]
    summary["seconds_per_epoch"] = float(np.mean([c["epoch_seconds"] for c in curve])) if curve else None
    write_json(run_dir / "curves" / f"{name}.json", {"name": name, **summary})
    return summary


def fit_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The training facts a metrics.json entry carries next to the test metrics."""
    return {"epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
            "train_seconds": round(summary["train_seconds"], 2), "seconds_per_epoch": summary["seconds_per_epoch"],
            "valid": summary["best_valid"], "num_workers": summary["num_workers"]}


def variant_features(feats, variant: str, seed: int):
    """The features a variant trains on: ``lane-shuffled`` gets another user's preferences."""
    return feats.shuffled(seed) if variant == "lane-shuffled" else feats


def _save_state(directory: Path, model, optimizer, state: dict[str, Any], best_state: dict | None, meta: dict) -> None:
    import torch

    from lane_ray.models import SequentialRecommender, save_checkpoint

    save_checkpoint(model, directory / "model", {**meta, "epochs_done": state["epoch"]})
    if best_state is not None:
        best = SequentialRecommender(model.cfg)
        best.load_state_dict(best_state)
        save_checkpoint(best, directory / "best", {**meta, "epoch": state["best_epoch"],
                                                    "valid": state["best_valid"]})
    # no RNG state: every epoch seeds its draws from (seed, epoch, rank) (lane_ray.train.loop.TrainingRun)
    torch.save({"optimizer": optimizer.state_dict(), **state}, directory / "train_state.pt")


def _die_after(batches: Any, n: int) -> Any:
    """Yield ``n`` batches, then kill this process the hard way (a worker lost in the middle of an epoch)."""
    for k, b in enumerate(batches):
        if k == n:
            os._exit(1)
        yield b


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (see the module docstring): :class:`~lane_ray.train.loop.TrainingRun` over this worker's
    shard, a checkpoint from rank 0 every epoch."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    from lane_ray.models import load_checkpoint
    from lane_ray.train.loop import FitSettings, TrainingRun

    tc = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(tc.seed)
    feats = variant_features(ray.get(config["features"]), tc.variant, tc.seed)
    model = build_model(tc, feats)
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    ddp = prepare_model(model) if world > 1 or tc.use_gpu else model
    model.to(device)
    run = TrainingRun(model, feats, FitSettings.of(tc), device, rank, module=ddp)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # restarted after a failure: resume where the last checkpoint left off
        with ckpt.as_directory() as d:
            resumed, _ = load_checkpoint(Path(d) / "model")
            model.load_state_dict(resumed.state_dict())
            saved = torch.load(Path(d) / "train_state.pt", weights_only=True)
            run.optimizer.load_state_dict(saved.pop("optimizer"))
            saved.pop("torch_rng", None)  # an RNG state is not needed: every epoch seeds its own draws
            run.state.update(saved)
            if (Path(d) / "best").exists():
                run.best_weights = load_checkpoint(Path(d) / "best")[0].state_dict()
        if rank == 0:
            log(f"train: resumed at epoch {run.state['epoch']} (best valid ndcg@10 {run.state['best_ndcg']:.4f})")
    shard = ray.train.get_dataset_shard("train")
    meta = {"backbone": tc.backbone, "variant": tc.variant, "seed": tc.seed, "loss": tc.loss}
    for epoch in range(run.state["epoch"], tc.epochs):
        # this worker's shard: user row numbers (8 bytes a user), in Ray Data's block order; TrainingRun shuffles
        # them by (seed, epoch, rank) (Ray Data's local shuffle depends on the iterator's own history, so a resumed
        # worker would see other batches)
        rows = np.concatenate([b["data"] for b in shard.iter_batches(batch_size=65_536, batch_format="numpy")]
                              or [np.zeros(0, np.int64)])
        fault = config.get("fail_at_epoch") == epoch and ckpt is None
        # fault injection for tests: the worker dies mid-epoch, once
        rec = run.train(rows, epoch, wrap=(lambda b: _die_after(b, 1)) if fault else None)
        stop = [False]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                stop[0] = run.validate(rec)
                v = rec["valid"]
                log(f"train: epoch {epoch + 1}/{tc.epochs} loss {rec['loss']:.4f} valid ndcg@10 full "
                    f"{v['full']['ndcg@10']:.4f} sampled100 {v['sampled100']['ndcg@10']:.4f} "
                    f"({rec['epoch_seconds']:.1f} s){' best' if run.state['best_epoch'] == epoch else ''}"
                    f"{' - stopping' if stop[0] else ''}")
                _save_state(Path(tmp), model, run.optimizer, run.state, run.best_weights, meta)
                checkpoint = Checkpoint.from_directory(tmp)
            if world > 1:
                dist.broadcast_object_list(stop, src=0)
            metrics = {"epoch": epoch, "loss": rec["loss"],
                       "valid_ndcg@10": rec["valid"]["full"]["ndcg@10"] if "valid" in rec else None}
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop[0]:
            break


def build_trainer(tc: TrainConfig, features_ref: Any, num_users: int, storage: Path | str, name: str,
                  resources: dict[str, float], fail_at_epoch: int | None = None):
    """A ``TorchTrainer`` for one variant. ``features_ref`` is an object ref of :class:`Features` (workers on
    other nodes get it from the object store); its ``num_users`` train rows are sharded through a Ray Data
    dataset."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # blocks in their order: a seed gives the same batches every time (also after a restart), not the order in
    # which Ray Data happened to finish them
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    threads = tc.threads_per_worker or max(1, int(resources.get("CPU", 1) // tc.num_workers))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": tc.model_dump(), "features": features_ref, "threads": threads,
                           "fail_at_epoch": fail_at_epoch},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        # blocks built in the driver: no read task has to find a CPU next to the train workers (on a 2-CPU node
        # two workers hold them all and a ReadRange task would wait forever)
        datasets={"train": ray.data.from_numpy(np.arange(num_users, dtype=np.int64))},
        dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(name=name, storage_path=storage if isinstance(storage, str) else str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )


def train_variant(tc: TrainConfig, ray_cfg: RayConfig, run_dir: Path, feats, fail_at_epoch: int | None = None,
                  quiet: bool = False) -> dict[str, Any]:
    """Train ``tc.variant`` with Ray Train; copy the best checkpoint to ``run_dir/checkpoints/<variant>/`` and the
    curve to ``run_dir/curves/<backbone>-<variant>-seed<k>.json``. Returns the curve summary."""
    import ray

    from lane_ray.pipeline.cluster import init_ray, wait_for_resources

    init_ray(ray_cfg)
    # each worker's bundle on some node: waits for the autoscaler (ray.resource_wait_s) instead of refusing
    worker = {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if tc.use_gpu else {})}
    resources = wait_for_resources([worker] * tc.num_workers, f"train ({tc.num_workers} Ray Train worker(s))", ray_cfg)
    from lane_ray.storage import remote_dir, resolve_uri

    name = run_name(tc)
    storage: Path | str = run_dir / "ray_train"
    remote = remote_dir(storage)
    if remote is not None:  # a run directory on s3:// / gs://: Ray Train checkpoints there itself
        fs, root = resolve_uri(f"{remote}/{name}")
        if fs.get_file_info(root).type.name != "NotFound":
            fs.delete_dir(root)
        storage = remote
    elif (run_dir / "ray_train" / name).exists():
        shutil.rmtree(run_dir / "ray_train" / name)  # a fresh run; resuming after failures happens inside one fit()
    t0 = time.perf_counter()
    result = build_trainer(tc, ray.put(feats), feats.split.num_users, storage, name, resources,
                           fail_at_epoch).fit()
    seconds = time.perf_counter() - t0
    if result.error is not None:
        raise LaneError(f"train: {name} failed: {result.error}")
    if result.checkpoint is None:
        raise LaneError(f"train: {name} reported no checkpoint")
    dest = run_dir / "checkpoints" / (tc.variant if tc.backbone == "sasrec" else f"{tc.backbone}-{tc.variant}")
    with result.checkpoint.as_directory() as d:
        import torch

        state = torch.load(Path(d) / "train_state.pt", weights_only=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(d) / "best", tmp)
        shutil.rmtree(dest, ignore_errors=True)
        publish(tmp, dest)
    curve = state["curve"]
    summary = {"checkpoint": str(dest), "epochs": len(curve), "best_epoch": state["best_epoch"],
               "best_valid": state["best_valid"], "train_seconds": seconds, "num_workers": tc.num_workers,
               "curve": curve}
    return finish_run(run_dir, name, summary)


def metrics_key(backbone: str, variant: str, seed: int) -> str:
    return f"{backbone}/{variant}/seed{seed}"


def evaluate_model(model, feats, tc: TrainConfig, variant: str, seed: int, faithfulness: bool = False,
                   device: str = "cpu") -> dict[str, Any]:
    """Test metrics of a trained model under both protocols (+ faithfulness for aligned models), with timings."""
    from lane_ray.train import loop

    vf = variant_features(feats, variant, seed)
    users = loop.eval_rows(vf.split.num_users, tc.eval_users)
    t0 = time.perf_counter()
    out: dict[str, Any] = dict(loop.evaluate(model, vf, "test", loop.PROTOCOLS, tc.eval_batch_size, device,
                                             seed=seed, users=users))
    out["eval_seconds"] = time.perf_counter() - t0
    out["eval_users"] = vf.split.num_users if users is None else int(users.size)
    if faithfulness and model.cfg.align:
        t0 = time.perf_counter()
        out["faithfulness"] = loop.faithfulness(model, vf, "test", tc.eval_batch_size, seed, device, users=users)
        out["faithfulness"]["seconds"] = time.perf_counter() - t0
    return out


def write_metrics(path: Path, key: str, result: dict[str, Any]) -> None:
    """Record ``result`` under ``key`` in metrics.json; a faithfulness result goes under ``faithfulness``."""
    from lane_ray.io import write_json

    doc = json.loads(path.read_text()) if path.exists() else {}
    result = dict(result)
    faith = result.pop("faithfulness", None)
    doc[key] = {**doc.get(key, {}), **result}
    if faith is not None:
        doc.setdefault("faithfulness", {})[key] = faith
    write_json(path, doc)


COMPUTE_FIELDS = ("num_workers", "use_gpu", "cpus_per_worker", "threads_per_worker", "max_failures",
                  "eval_batch_size")


def training_fingerprint(tc: TrainConfig, run_dir: Path) -> str:
    """Hash of what a trained variant depends on: the train settings (not the compute layout), the prepared data
    and the embeddings it reads. A current fingerprint in metrics.json lets ``lane run`` skip the training."""
    import hashlib

    h = hashlib.sha1(json.dumps(tc.model_dump(exclude=set(COMPUTE_FIELDS)), sort_keys=True).encode())
    inputs = ["data/interactions.parquet", "data/catalog.parquet"]
    if tc.variant != "id":
        inputs.append("item_embeddings.parquet")
    if tc.variant.startswith("lane"):
        inputs.append("preference_embeddings.parquet")
    for rel in inputs:
        # the Parquet files themselves (name, size, mtime): manifests carry run timings and change every run
        p = run_dir / rel
        files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p] if p.exists() else []
        h.update(rel.encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(run_dir)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


# The attribution columns of candidates.parquet and controls.parquet (docs/design.md "Explanations follow the model").
ATTRIBUTION_COLUMNS = ("pref_contrib", "pref_share", "history_item_ids", "history_contrib", "hit_rate")


def _lists(values: np.ndarray, lengths: np.ndarray, dtype: Any) -> Any:
    """A list array of row r = ``values[r, :lengths[r]]`` (``values [R, w]``)."""
    import pyarrow as pa

    R = len(lengths)
    w = values.shape[1] if values.ndim == 2 else 0
    keep = np.arange(w)[None, :] < lengths[:, None] if R else np.zeros((0, w), dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = values[keep] if w else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, dtype))


def candidate_table(rec: dict[str, Any], feats, calibration: dict[str, Any]) -> Any:
    """The candidates schema from :func:`~lane_ray.train.loop.recommend`-shaped arrays: user_id, item_id, rank,
    score, preference_weights, and the attribution columns. ``pref_contrib`` follows the slot order of the user's
    preferences (preferences.parquet's list) up to their last slot with a vector (an absent slot before it gets
    0); ``history_item_ids`` are catalogue ids, most contributing first; ``hit_rate`` is the calibrated hit rate of
    the row's rank."""
    import pyarrow as pa

    from lane_ray.train.loop import hit_rate_at

    R = len(rec["rank"])
    w = rec["preference_weights"]
    weights = (pa.array(list(w.astype(np.float32)), pa.list_(pa.float32())) if w is not None
               else pa.nulls(R, pa.list_(pa.float32())))
    contrib = rec.get("pref_contrib")
    if contrib is None or contrib.shape[1] == 0 or feats.pref_mask is None:
        n_pref = np.zeros(R, dtype=np.int64)
        contrib = np.zeros((R, 0), np.float32)
    else:
        rows = np.searchsorted(feats.split.user_ids, rec["user_id"])
        mask = feats.pref_mask[rows][:, :contrib.shape[1]]  # [R, m]
        n_pref = np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], 1), 0)
    h_idx = rec.get("history_index")
    if h_idx is None:
        h_idx, h_val = np.zeros((R, 0), np.int64), np.zeros((R, 0), np.float32)
    else:
        h_val = rec["history_contrib"]
    n_hist = (h_idx > 0).sum(1)  # found items come first
    h_ids = np.where(h_idx > 0, feats.index.item_ids[np.maximum(h_idx, 1) - 1], 0)
    share = rec.get("pref_share")
    return pa.table({
        "user_id": pa.array(rec["user_id"], pa.int64()), "item_id": pa.array(rec["item_id"], pa.int64()),
        "rank": pa.array(rec["rank"], pa.int64()), "score": pa.array(rec["score"], pa.float64()),
        "preference_weights": weights,
        "pref_contrib": _lists(contrib.astype(np.float32), n_pref, pa.float32()),
        "pref_share": pa.array(np.zeros(R, np.float32) if share is None else share.astype(np.float32), pa.float32()),
        "history_item_ids": _lists(h_ids.astype(np.int64), n_hist, pa.int64()),
        "history_contrib": _lists(h_val.astype(np.float32), n_hist, pa.float32()),
        "hit_rate": pa.array(hit_rate_at(calibration, rec["rank"]), pa.float32()),
    })


def write_candidates(model, feats, path: Path, k: int = 10, history_top: int = 3, history_window: int = 50,
                     controls: int = 3, seed: int = 0) -> int:
    """The model's top-``k`` recommendations per user (after the full history) as the candidates file of
    ``lane explain``: user_id, item_id, rank, score, preference_weights and each row's item-level attribution
    (``pref_contrib``, ``pref_share``, ``history_item_ids``, ``history_contrib``; see
    :func:`lane_ray.models.attribute`) with ``hit_rate``, the validation-calibrated chance that the item at that
    rank is the user's next one. A user with fewer than ``k`` unseen items gets fewer rows (seen items score -inf
    and are not recommendations). Beside it: ``calibration.json`` (the hit rate by rank bin, from the validation
    split) and ``controls.parquet`` (the same schema for ``controls`` low-ranked unseen items per user, rank worse
    than 500 or in the lower half of small catalogues, ``seed`` fixed: negative controls). Returns the number of
    candidate rows."""
    from lane_ray.io import write_json, write_parquet
    from lane_ray.train.loop import hit_rate_calibration, recommend_with_controls

    path = Path(path)
    calibration = hit_rate_calibration(model, feats, "valid")
    write_json(path.parent / "calibration.json", calibration)
    rec, neg = recommend_with_controls(model, feats, k, controls, seed=seed, history_top=history_top,
                                       history_window=history_window)
    ok = np.isfinite(rec["score"])  # a user who has seen (nearly) every item has fewer than k recommendable ones
    rec = {key: (v[ok] if v is not None else None) for key, v in rec.items()}
    table = candidate_table(rec, feats, calibration)
    if controls:
        write_parquet(path.parent / "controls.parquet", candidate_table(neg, feats, calibration))
    write_parquet(path, table)
    return table.num_rows
