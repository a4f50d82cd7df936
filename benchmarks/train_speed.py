"""Seconds per training epoch with Ray Train (1, 2, ... workers) and seconds to evaluate all users.

    python benchmarks/train_speed.py --run runs/default --workers 1,2 --epochs 3 --json

On a run directory with data, item and preference embeddings (``lane run``). For each worker count it trains the
``--variant`` (default lane) SASRec for ``--epochs`` epochs through :func:`lane_ray.pipeline.train.train_variant`
(early stopping off) and reports the mean epoch time of epochs after the first (the first includes worker warm-up)
and the whole ``fit()`` wall time including Ray Train start-up; then the full-ranking + sampled-100 evaluation of
every user. One JSON line; also written to ``benchmarks/results/train_speed.json`` unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from _results import emit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default")
    p.add_argument("--variant", default="lane")
    p.add_argument("--backbone", default="sasrec")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from lane_ray.config import RayConfig, TrainConfig
    from lane_ray.models import load_checkpoint
    from lane_ray.pipeline.train import evaluate_model, train_variant
    from lane_ray.train.features import load_features

    run = Path(args.run)
    feats = load_features(run, titles=args.variant != "id", preferences=args.variant.startswith("lane"))
    cpus = os.cpu_count() or 1
    out: dict = {"run": str(run), "variant": args.variant, "backbone": args.backbone, "users": feats.split.num_users,
                 "items": feats.num_items, "cpus": cpus, "machine": platform.processor() or platform.machine(),
                 "cuda": torch.cuda.get_device_name(0) if args.use_gpu and torch.cuda.is_available() else None,
                 "workers": {}}
    ray_cfg = RayConfig(num_cpus=cpus, object_store_memory_mb=512)
    bench_dir = Path("/tmp/lane_train_speed")
    model = None
    for w in [int(x) for x in args.workers.split(",")]:
        tc = TrainConfig(backbone=args.backbone, variant=args.variant, num_workers=w, epochs=args.epochs,
                         patience=args.epochs, use_gpu=args.use_gpu, cpus_per_worker=max(0.5, min(1.0, cpus / w)))
        t0 = time.perf_counter()
        s = train_variant(tc, ray_cfg, bench_dir, feats)
        secs = [c["epoch_seconds"] for c in s["curve"]]
        out["workers"][str(w)] = {"seconds_per_epoch": float(np.mean(secs[1:] if len(secs) > 1 else secs)),
                                  "first_epoch_seconds": secs[0], "fit_seconds": round(time.perf_counter() - t0, 1),
                                  "epochs": len(secs)}
        print(f"train_speed: {w} worker(s): {out['workers'][str(w)]}", file=sys.stderr, flush=True)
        model, _ = load_checkpoint(s["checkpoint"])
    if model is not None:
        torch.set_num_threads(cpus)
        evaluate_model(model, feats, tc, args.variant, 0)  # warm-up
        t0 = time.perf_counter()
        evaluate_model(model, feats, tc, args.variant, 0)
        out["evaluate_all_users_seconds"] = round(time.perf_counter() - t0, 3)
    return emit(out, "train_speed", not args.no_save, args.json)


if __name__ == "__main__":
    sys.exit(main())
