"""Is the alignment layer limited by the LLM's preferences? Train the SASRec ``lane`` variant with preference
vectors from different sources and compare on validation and test.

    python benchmarks/preference_sources.py --run runs/default --seeds 3 --json

Sources: ``llm`` (the run's ``preference_embeddings.parquet``), ``genre_baseline`` (each user's m most frequent
training-prefix genres as "<genre> movies", embedded with the same MiniLM encoder: no LLM, no leakage), and
``none`` (every user without preferences: the alignment layer passes states through, i.e. the ``title``
architecture with the layer's extra parameters). Same training settings and seeds for all. One JSON line;
also written to ``benchmarks/results/preference_sources.json`` unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _results import emit


def genre_preferences(run: Path, feats, m: int) -> np.ndarray:
    """[U, m, D] embeddings of the genre-baseline preferences of every user's train prefix."""
    from lane_ray.data import read_prepared
    from lane_ray.llm import quality as q
    from lane_ray.text import TextEncoder

    cat = read_prepared(run).catalog
    row = {int(i): k for k, i in enumerate(cat["item_id"].to_pylist())}
    genres = [q.split_genres(g) for g in cat["genres"].to_pylist()]
    years = cat["year"].to_pylist() if "year" in cat.column_names else [None] * cat.num_rows
    texts = []
    for i in range(feats.split.num_users):
        prefix = [row[int(x)] for x in feats.split.train_prefix(i)]
        prefs, _ = q.genre_baseline([genres[k] for k in prefix], [years[k] for k in prefix], m)
        texts.append(prefs)
    uniq = sorted({t for lst in texts for t in lst})
    emb = TextEncoder().encode(uniq)
    pos = {t: k for k, t in enumerate(uniq)}
    return np.stack([emb[[pos[t] for t in lst]] for lst in texts]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sources", default="llm,genre_baseline,none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import torch

    from lane_ray.config import TrainConfig
    from lane_ray.pipeline.experiment import train_in_process
    from lane_ray.pipeline.train import evaluate_model
    from lane_ray.train.features import load_features

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    feats = load_features(run)
    m = feats.prefs.shape[1]
    sources = {}
    for name in args.sources.split(","):
        if name == "llm":
            sources[name] = feats
        elif name == "genre_baseline":
            sources[name] = replace(feats, prefs=genre_preferences(run, feats, m),
                                    pref_mask=np.ones_like(feats.pref_mask))
        elif name == "none":
            sources[name] = replace(feats, pref_mask=np.zeros_like(feats.pref_mask))
        else:
            raise SystemExit(f"unknown source {name!r}")
    out: dict = {"run": str(run), "seeds": args.seeds, "sources": {}}
    for name, f in sources.items():
        runs = []
        for seed in range(args.seeds):
            tc = TrainConfig(variant="lane", seed=seed)
            t0 = time.perf_counter()
            model, s = train_in_process(tc, f, Path("/tmp/lane_pref_sources") / name)
            r = evaluate_model(model, f, tc, "lane", seed, faithfulness=name != "none")
            runs.append({"seed": seed, "valid_full_ndcg@10": s["best_valid"]["full"]["ndcg@10"],
                         "test_full_ndcg@10": r["full"]["ndcg@10"],
                         "test_sampled100_ndcg@10": r["sampled100"]["ndcg@10"],
                         "faithfulness": (r.get("faithfulness") or {}).get("top_hurts_more"),
                         "epochs": s["epochs"], "seconds": round(time.perf_counter() - t0, 1)})
            print(f"preference_sources {name} seed{seed}: {runs[-1]}", file=sys.stderr, flush=True)
        summary = {k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs], ddof=1))
                       if len(runs) > 1 else 0.0]
                   for k in ("valid_full_ndcg@10", "test_full_ndcg@10", "test_sampled100_ndcg@10")}
        out["sources"][name] = {"mean_std": summary, "runs": runs}
    return emit(out, "preference_sources", not args.no_save, args.json)


if __name__ == "__main__":
    sys.exit(main())
