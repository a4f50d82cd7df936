"""Grid search of training settings on the *validation* split only (the test split is never looked at).

    python benchmarks/tune.py --run runs/default --variant id --grid lr=5e-4,1e-3,2e-3 --grid dropout=0.2,0.5 --json

Each grid point trains in-process with early stopping on validation NDCG@10 (full ranking); the JSON line lists
every point's best validation metrics, epochs and seconds, and the best point. Results are also written to
``benchmarks/results/tune_<backbone>_<variant>.json`` unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import yaml
from _results import emit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default", help="run directory with data, embeddings, preferences")
    p.add_argument("--backbone", default="sasrec")
    p.add_argument("--variant", default="id")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a train config field and its values (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="fixed train config fields")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import torch

    from lane_ray.config import TrainConfig
    from lane_ray.pipeline.experiment import train_in_process
    from lane_ray.train.features import load_features

    torch.set_num_threads(args.threads)
    def value(text: str):
        try:
            return float(text) if any(c in text for c in ".eE") and not text.isalpha() else yaml.safe_load(text)
        except ValueError:
            return yaml.safe_load(text)

    fixed = {k: value(v) for k, v in (s.split("=", 1) for s in args.set)}
    axes = [(k, [value(x) for x in v.split(",")]) for k, v in (g.split("=", 1) for g in args.grid)]
    feats = load_features(args.run, titles=args.variant != "id", preferences=args.variant.startswith("lane"))
    points = []
    for values in itertools.product(*[vals for _, vals in axes]):
        setting = dict(zip([k for k, _ in axes], values, strict=True))
        tc = TrainConfig(backbone=args.backbone, variant=args.variant, **fixed, **setting)
        t0 = time.perf_counter()
        _, s = train_in_process(tc, feats, Path("/tmp/lane_tune"))
        point = {"setting": setting, "valid": s["best_valid"], "best_epoch": s["best_epoch"], "epochs": s["epochs"],
                 "seconds": round(time.perf_counter() - t0, 1)}
        points.append(point)
        print(f"tune {setting}: valid full ndcg@10 {s['best_valid']['full']['ndcg@10']:.4f} "
              f"(epoch {s['best_epoch']}, {point['seconds']} s)", file=sys.stderr, flush=True)
    best = max(points, key=lambda q: q["valid"]["full"]["ndcg@10"])
    out = {"backbone": args.backbone, "variant": args.variant, "fixed": fixed, "points": points,
           "best": best["setting"], "best_valid_ndcg@10": best["valid"]["full"]["ndcg@10"]}
    return emit(out, f"tune_{args.backbone}_{args.variant}", not args.no_save, args.json)


if __name__ == "__main__":
    sys.exit(main())
