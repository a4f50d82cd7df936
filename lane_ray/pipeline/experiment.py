"""The ablation experiment: for each backbone, the variants ``id``, ``title``, ``lane``, ``lane-shuffled`` over
several seeds, trained with the same pure epoch functions (in-process, or Ray Train with ``workers >= 1``),
selected on validation NDCG@10 only, evaluated on test under both protocols. Writes ``metrics.json`` (one key per
``<backbone>/<variant>/seed<k>``, plus ``faithfulness``), ``ablation.md`` (mean ± std over seeds) and
``ablation.png``."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lane_ray.config import BACKBONES, VARIANTS, RayConfig, TrainConfig
from lane_ray.progress import log

TABLE_METRICS = ("ndcg@10", "hr@10")


def train_in_process(tc: TrainConfig, feats, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Train one variant in this process (the pure loop, no Ray); returns the best model and the fit summary."""
    import torch

    from lane_ray.models import save_checkpoint
    from lane_ray.pipeline.train import build_model, finish_run, run_name, variant_features
    from lane_ray.train.loop import FitSettings, fit

    threads = torch.get_num_threads()
    torch.set_num_threads(tc.threads_per_worker or threads)
    try:
        torch.manual_seed(tc.seed)  # as a Ray Train worker does: the same initial weights and dropout masks
        vf = variant_features(feats, tc.variant, tc.seed)
        model = build_model(tc, vf)
        summary = fit(model, vf, FitSettings.of(tc))
    finally:
        torch.set_num_threads(threads)
    name = run_name(tc)
    save_checkpoint(model, run_dir / "checkpoints" / name,
                    {"backbone": tc.backbone, "variant": tc.variant, "seed": tc.seed, "loss": tc.loss,
                     "epoch": summary["best_epoch"], "valid": summary["best_valid"]})
    summary["num_workers"] = 0
    return model, finish_run(run_dir, name, summary)


def run_ablation(base: TrainConfig, ray_cfg: RayConfig, run_dir: Path, feats, backbones: Sequence[str],
                 variants: Sequence[str], seeds: int, workers: int = 0, faithfulness: bool = True,
                 quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate every (backbone, variant, seed); finished keys already in metrics.json are skipped, so an
    interrupted experiment resumes."""
    from lane_ray.models import load_checkpoint
    from lane_ray.pipeline.train import evaluate_model, fit_record, metrics_key, train_variant, write_metrics

    metrics_path = run_dir / "metrics.json"
    done = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    total = len(backbones) * len(variants) * seeds
    k = 0
    for backbone in backbones:
        for variant in variants:
            for seed in range(seeds):
                k += 1
                key = metrics_key(backbone, variant, seed)
                if key in done and "full" in done[key] and "epochs" in done[key]:
                    continue
                tc = base.model_copy(update={"backbone": backbone, "variant": variant, "seed": seed,
                                             "num_workers": max(workers, 1)})
                t0 = time.perf_counter()
                if workers >= 1:
                    summary = train_variant(tc, ray_cfg, run_dir, feats, quiet=quiet)
                    model, _ = load_checkpoint(summary["checkpoint"])
                else:
                    model, summary = train_in_process(tc, feats, run_dir)
                result = evaluate_model(model, feats, tc, variant, seed, faithfulness=faithfulness)
                result.update(fit_record(summary))
                write_metrics(metrics_path, key, result)
                if not quiet:
                    log(f"ablation [{k}/{total}] {key}: test full ndcg@10 {result['full']['ndcg@10']:.4f}, "
                        f"sampled100 ndcg@10 {result['sampled100']['ndcg@10']:.4f} ({summary['epochs']} epochs, "
                        f"{time.perf_counter() - t0:.0f} s)")
    doc = json.loads(metrics_path.read_text())
    # the report covers every run recorded in this directory, also those of earlier invocations
    present = {k.split("/")[0] for k in doc if k.count("/") == 2}
    write_report(doc, run_dir, [b for b in BACKBONES if b in present or b in backbones], VARIANTS)
    return doc


def aggregate(doc: dict[str, Any], backbones: Sequence[str], variants: Sequence[str]) -> dict[str, Any]:
    """``{backbone: {variant: {protocol: {metric: (mean, std, n)}}}}`` over the seeds present in ``doc``."""
    out: dict[str, Any] = {}
    for b in backbones:
        for v in variants:
            runs = [val for key, val in doc.items() if key.startswith(f"{b}/{v}/seed") and "full" in val]
            if not runs:
                continue
            cell = out.setdefault(b, {}).setdefault(v, {})
            for proto in ("full", "sampled100"):
                cell[proto] = {}
                for metric in runs[0][proto]:
                    xs = np.array([r[proto][metric] for r in runs])
                    cell[proto][metric] = (float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0, xs.size)
    return out


def write_report(doc: dict[str, Any], run_dir: Path, backbones: Sequence[str], variants: Sequence[str]) -> None:
    """``ablation.md`` (mean ± std over seeds, both protocols, lane vs id gain, faithfulness) and ``ablation.png``."""
    from lane_ray.atomic import atomic_open

    agg = aggregate(doc, backbones, variants)
    lines = ["# Ablation", "", "Test split, all users; mean ± std (sample) over seeds, n = seeds (no spread with one "
             "seed); model selection on validation NDCG@10 (full ranking) only.", ""]
    for proto in ("sampled100", "full"):
        lines += [f"## {proto}", "", "| backbone | variant | n | " + " | ".join(TABLE_METRICS) + " | vs id |",
                  "|---|---|---|" + "---|" * (len(TABLE_METRICS) + 1)]
        for b, cells in agg.items():
            base = cells.get("id", {}).get(proto, {}).get("ndcg@10", (None,))[0]
            for v, cell in cells.items():
                mean = cell[proto]["ndcg@10"][0]
                rel = f"{mean / base:.3f}x" if base else "-"
                vals = " | ".join(f"{cell[proto][m][0]:.4f}" + (f" ± {cell[proto][m][1]:.4f}" if cell[proto][m][2] > 1
                                                                 else "") for m in TABLE_METRICS)
                lines.append(f"| {b} | {v} | {cell[proto]['ndcg@10'][2]} | {vals} | {rel} |")
        lines.append("")
    faith = doc.get("faithfulness", {})
    if faith:
        lines += ["## Faithfulness", "", "Share of test users whose target score drops more when the highest-weight "
                  "preference is removed than when a random other one is.", "", "| run | users | top hurts more |",
                  "|---|---|---|"]
        for key, f in sorted(faith.items()):
            share = f.get("top_hurts_more")
            lines.append(f"| {key} | {f.get('users')} | {share:.3f} |" if share is not None else f"| {key} | 0 | - |")
        lines.append("")
    with atomic_open(run_dir / "ablation.md") as fh:
        fh.write("\n".join(lines))
    plot_ablation(agg, run_dir / "ablation.png")


def plot_ablation(agg: dict[str, Any], path: Path) -> None:
    """Grouped bars of NDCG@10 (mean, std error bars) per backbone and variant, one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lane_ray.atomic import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    backbones = list(agg)
    for ax, proto in zip(axes, ("sampled100", "full"), strict=True):
        width = 0.8 / max(1, len(VARIANTS))
        for j, v in enumerate(VARIANTS):
            xs, ys, es = [], [], []
            for i, b in enumerate(backbones):
                if v in agg[b]:
                    m, s, _ = agg[b][v][proto]["ndcg@10"]
                    xs.append(i + (j - (len(VARIANTS) - 1) / 2) * width)
                    ys.append(m)
                    es.append(s)
            if xs:
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=v)
        ax.set_xticks(range(len(backbones)), backbones)
        ax.set_title(f"NDCG@10, {proto}")
        ax.set_ylabel("test NDCG@10")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
