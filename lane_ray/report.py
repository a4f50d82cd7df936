"""The run report: ``RUN/report/report.md`` with PNG plots, every number read from the run's artifacts.

Sections (each says which command produces its artifact when the run has none): the ablation (``metrics.json``),
training curves (``curves/*.json``), per-stage timings and throughput (``timings.json``), alignment weights as a
heat map (users × preferences, ``candidates.parquet`` + ``preferences.parquet``) next to the same users'
explanations (``explanations.parquet``), and the logic-check rates (``explanation_checks.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

VARIANT_ORDER = ("id", "title", "lane", "lane-shuffled")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    from lane_ray.atomic import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)
    return path.name


def _missing(what: str, command: str) -> list[str]:
    return [f"_No {what} in this run (`{command}` produces it)._", ""]


def ablation_section(run: Path, out: Path) -> list[str]:
    from lane_ray.pipeline.experiment import aggregate, plot_ablation

    path = run / "metrics.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    keys = [k for k, v in doc.items() if k.count("/") == 2 and isinstance(v, dict) and "full" in v]
    lines = ["## Ablation", ""]
    if not keys:
        return lines + _missing("test metrics", "lane run / lane experiment ablation")
    backbones = sorted({k.split("/")[0] for k in keys})
    variants = [v for v in VARIANT_ORDER if any(k.split("/")[1] == v for k in keys)]
    agg = aggregate(doc, backbones, variants)
    plot_ablation(agg, out / "ablation.png")
    lines += ["Test split, all users; mean ± std over seeds (n seeds).", "", "![ablation](ablation.png)", "",
              "| backbone | variant | n | sampled100 NDCG@10 | full NDCG@10 | full HR@10 |",
              "|---|---|---|---|---|---|"]
    for b, cells in agg.items():
        for v, cell in cells.items():
            s, f, h = cell["sampled100"]["ndcg@10"], cell["full"]["ndcg@10"], cell["full"]["hr@10"]
            lines.append(f"| {b} | {v} | {s[2]} | {s[0]:.4f} ± {s[1]:.4f} | {f[0]:.4f} ± {f[1]:.4f} | "
                         f"{h[0]:.4f} ± {h[1]:.4f} |")
    faith = doc.get("faithfulness", {})
    if faith:
        lines += ["", "Faithfulness (share of users whose target score drops more without the top-weight preference "
                  "than without a random one): " + ", ".join(f"{k} {v['top_hurts_more']:.3f}"
                                                             for k, v in sorted(faith.items())
                                                             if v.get("top_hurts_more") is not None) + "."]
    return lines + [""]


def curves_section(run: Path, out: Path, limit: int = 12) -> list[str]:
    files = sorted((run / "curves").glob("*.json"))[:limit]
    lines = ["## Training curves", ""]
    if not files:
        return lines + _missing("training curves", "lane train / lane run")
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    for f in files:
        d = json.loads(f.read_text())
        curve = d.get("curve", [])
        ep = [c["epoch"] for c in curve]
        a1.plot(ep, [c["loss"] for c in curve], label=d.get("name", f.stem))
        a2.plot(ep, [c["valid"]["full"]["ndcg@10"] for c in curve], label=d.get("name", f.stem))
        best = d.get("best_valid")
        best = best.get("full", {}).get("ndcg@10") if isinstance(best, dict) else best
        rows.append(f"| {d.get('name', f.stem)} | {d.get('epochs')} | {d.get('best_epoch')} | "
                    f"{'-' if best is None else f'{best:.4f}'} | {(d.get('seconds_per_epoch') or 0):.2f} |")
    a1.set(title="training loss", xlabel="epoch")
    a2.set(title="validation NDCG@10 (full ranking)", xlabel="epoch")
    a2.legend(fontsize=7)
    _save(fig, out / "curves.png")
    return lines + ["![curves](curves.png)", "", "| run | epochs | best epoch | best valid | s / epoch |",
                    "|---|---|---|---|---|", *rows, ""]


_ORDER = ("synth", "data", "embed_catalog", "preferences", "embed_preferences", "train_", "evaluate_", "explain",
          "report")


def _stage_order(name: str) -> tuple[int, str, int]:
    """Pipeline order: data before embeddings before training; each variant's training before its evaluation."""
    group = next((i for i, p in enumerate(_ORDER) if name == p or (p.endswith("_") and name.startswith(p))),
                 len(_ORDER))
    if name.startswith(("train_", "evaluate_")):
        return _ORDER.index("train_"), name.split("_", 1)[1], 0 if name.startswith("train_") else 1
    return group, name, 0


def timings_section(run: Path, out: Path) -> list[str]:
    path = run / "timings.json"
    lines = ["## Stages: time, memory, throughput", ""]
    if not path.exists():
        return lines + _missing("stage timings", "lane run")
    doc = json.loads(path.read_text())
    names = sorted(doc, key=_stage_order)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(3, 0.3 * len(names) + 1)))
    a1.barh(names, [doc[n].get("seconds") or 0 for n in names])
    a1.set(title="wall seconds")
    a2.barh(names, [doc[n].get("peak_tree_rss_mb") or doc[n].get("peak_rss_mb") or 0 for n in names],
             color="tab:orange")
    a2.set(title="peak memory, driver + local Ray processes (MB)")
    a2.set_yticks([])
    a1.invert_yaxis()
    a2.invert_yaxis()
    _save(fig, out / "timings.png")
    rows = []
    for n in names:
        t = doc[n]
        rate = next((f"{k} {v:.1f}" for k, v in t.items() if k.endswith("_per_s") and v), "")
        tree = t.get("peak_tree_rss_mb")
        rows.append(f"| {n} | {t.get('seconds', 0):.2f} | {t.get('peak_rss_mb', 0):.0f} | "
                    f"{'' if tree is None else f'{tree:.0f}'} | {t.get('rows', '')} | {rate} |")
    return lines + ["![timings](timings.png)", "", "Peak memory: the driver's RSS, and the driver with the processes "
                    "of the local Ray cluster it started (private memory of each plus the largest shared mapping "
                    "once; blank when the stage ran on a remote cluster or before this was recorded).", "",
                    "| stage | seconds | driver peak RSS MB | driver + Ray peak MB | rows | throughput |",
                    "|---|---|---|---|---|---|", *rows, ""]


def attention_section(run: Path, out: Path, users: int = 10) -> list[str]:
    from lane_ray.io import read_parquet

    lines = ["## Which preference drove the top recommendation", ""]
    cand = run / "candidates.parquet"
    if not cand.exists():
        return lines + _missing("candidates with alignment weights", "lane run")
    import pyarrow.compute as pc

    c = read_parquet(cand)
    if "preference_weights" not in c.column_names:
        c = c.append_column("preference_weights", pa.nulls(c.num_rows, pa.list_(pa.float32())))
    # in Arrow: a large run has millions of candidate rows and the section needs a few users' top rows
    first = pc.and_(pc.equal(c["rank"], 1), pc.greater(pc.list_value_length(c["preference_weights"]), 0))
    top = c.filter(pc.fill_null(first, False)).slice(0, users).to_pylist()
    if not top:
        return lines + ["_The served model has no alignment layer (no weights in candidates.parquet)._", ""]
    prefs: dict[int, list[str]] = {}
    if (run / "preferences.parquet").exists():
        t = read_parquet(run / "preferences.parquet", ["user_id", "preferences"])
        prefs = {int(u): list(p or []) for u, p in zip(t["user_id"].to_pylist(), t["preferences"].to_pylist(),
                                                       strict=True)}
    expl: dict[tuple[int, int], str] = {}
    if (run / "explanations.parquet").exists():
        e = read_parquet(run / "explanations.parquet", ["user_id", "item_id", "reason"])
        e = e.filter(pc.is_in(e["user_id"], pa.array([r["user_id"] for r in top], e["user_id"].type))).to_pylist()
        expl = {(int(r["user_id"]), int(r["item_id"])): r["reason"] or "" for r in e}
    m = max(len(r["preference_weights"]) for r in top)
    import numpy as np

    w = np.zeros((len(top), m))
    for i, r in enumerate(top):
        w[i, :len(r["preference_weights"])] = r["preference_weights"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * m + 3, 0.45 * len(top) + 1.5))
    im = ax.imshow(w, cmap="Blues", vmin=0, vmax=max(1e-6, float(w.max())), aspect="auto")
    for i in range(len(top)):
        for j in range(m):
            ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(top)), [f"user {r['user_id']}" for r in top])
    ax.set_xticks(range(m), [f"pref {j + 1}" for j in range(m)])
    ax.set_title("alignment weights of each user's top recommendation")
    fig.colorbar(im, ax=ax)
    _save(fig, out / "attention.png")
    lines += ["![attention](attention.png)", "", "| user | top item | top-weight preference (weight) | explanation |",
              "|---|---|---|---|"]
    for r in top:
        u, ws = int(r["user_id"]), r["preference_weights"]
        j = int(np.argmax(ws))
        p = prefs.get(u, [])
        name = p[j] if j < len(p) else f"preference {j + 1}"
        reason = expl.get((u, int(r["item_id"])), "_not explained (`lane explain`)_").replace("|", "/")
        lines.append(f"| {u} | {r['item_id']} | {name} ({ws[j]:.2f}) | {reason} |")
    return lines + [""]


def checks_section(run: Path) -> list[str]:
    """The explanation checks of ``explanation_checks.json``, each rate beside its chance level."""
    path = run / "explanation_checks.json"
    lines = ["## Do the explanations follow the model?", ""]
    if not path.exists():
        return lines + _missing("explanation check rates", "lane explain")
    doc = json.loads(path.read_text())
    rates, passed, measured = doc.get("rates", {}), doc.get("passed", {}), doc.get("measured", {})
    chance = doc.get("chance", {})

    def num(v: Any) -> str:
        return "-" if not isinstance(v, (int, float)) else f"{v:.3f}"

    rows = [f"| {k} | {num(v)} | {num(chance.get(k))} | {passed.get(k, '-')} / {measured.get(k, '-')} |"
            for k, v in rates.items()]
    src = ", ".join(f"{k} {v}" for k, v in doc.get("source", {}).items())
    head = (f"{doc.get('rows', 0)} explanations of {doc.get('users', 0)} users ({doc.get('mode', 'grounded')} mode); "
            f"source: {src or '-'}; format_ok {doc.get('format_ok', '-')}; citing history items: "
            f"{doc.get('cites_history', '-')}.")
    note = [f"_{doc['likelihood_note']}_", ""] if doc.get("likelihood_note") else []
    return lines + [head, "", *note, "| check | rate | chance | passed / measured |", "|---|---|---|---|", *rows,
                    "", "unsupported_claims: lower is better (passed / measured = unsupported / all genre and decade "
                    "words).", ""]


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default ``RUN/report``); returns the report's path."""
    from lane_ray.atomic import atomic_open
    from lane_ray.errors import DataError

    run = Path(run_dir)
    if not run.is_dir():
        raise DataError("run directory not found", file=run)
    dest = Path(out) if out is not None else run / "report"
    dest.mkdir(parents=True, exist_ok=True)
    lines = [f"# LANE-Ray run report: {run.name}", "", f"Run directory `{run}`. Every number below is read from its "
             "artifacts.", ""]
    lines += ablation_section(run, dest) + curves_section(run, dest) + timings_section(run, dest)
    lines += attention_section(run, dest) + checks_section(run)
    path = dest / "report.md"
    with atomic_open(path) as fh:
        fh.write("\n".join(lines))
    return path
