"""The stages of a LANE run, what each reads and writes in the run directory, and when each is skipped.

``lane run`` (:func:`run_pipeline`), the single-stage commands of the CLI and :class:`lane_ray.api.Pipeline` all
go through these functions; they take a validated :class:`~lane_ray.config.LaneConfig` whose ``run.out`` is a
local folder (a URI is staged by the caller: :func:`lane_ray.storage.open_run`). Every stage reports into the
run's progress view (:class:`lane_ray.progress.Stage`) and is skipped when its output is current: the data by
its fingerprint, embeddings and LLM outputs by content keys, training by its fingerprint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lane_ray.errors import LaneError

RUN_STAGES = ["data", "embed_catalog", "preferences", "embed_preferences", "train_sasrec_id", "evaluate_sasrec_id",
              "train_sasrec_lane", "evaluate_sasrec_lane", "explain", "report"]


def prepare_data(cfg, quiet: bool, force: bool = False) -> dict[str, Any]:
    """The canonical tables of ``cfg.data`` in ``RUN/data`` (skipped when current, unless ``force``); the
    preparation summary (``RUN/data/prepare.json``)."""
    from lane_ray.data import load_dataset, prepared_is_current, write_prepared
    from lane_ray.progress import Stage

    out = Path(cfg.run.out)
    with Stage("data", out, quiet=quiet) as st:
        if not force and prepared_is_current(out, cfg.data):
            st.skipped = True
            summary = json.loads((out / "data" / "prepare.json").read_text())
        else:
            prepared = load_dataset(cfg.data)
            summary = write_prepared(prepared, out, cfg.data)
        st.rows = summary["stats"]["interactions"]
    return summary


def dataset_stats(cfg, quiet: bool) -> dict[str, Any]:
    """Statistics of ``cfg.data`` after preprocessing (nothing written): users, items, interactions, ..., and the
    preprocessing report."""
    from lane_ray.data import load_dataset
    from lane_ray.progress import Stage

    with Stage(f"load {cfg.data.dataset}", quiet=quiet):
        prepared = load_dataset(cfg.data)
    return {"dataset": prepared.name, **prepared.stats(), "preprocessing": prepared.report}


def synthesize(cfg, quiet: bool) -> dict[str, Any]:
    """A synthetic dataset (``cfg.synth``) in ``RUN/data``; its summary."""
    from lane_ray.data.synth import generate, percent_logger
    from lane_ray.progress import Stage

    with Stage("synth", cfg.run.out, quiet=quiet) as st:
        summary = generate(cfg.synth, cfg.run.out, progress=None if quiet else percent_logger())
        st.rows = summary["interactions"]
    return summary


def embedding_paths(out: str | None, catalog: str | None, run_out: str) -> tuple[Path, Path]:
    """``--out`` is the embeddings path when it ends in .parquet, else the run directory (``run_out``: the staged
    folder when ``--out`` is a URI)."""
    from lane_ray.storage import is_uri

    if is_uri(out):
        out = run_out
    if out is not None and out.endswith(".parquet"):
        dest = Path(out)
        run_dir = dest.parent
    else:
        run_dir = Path(out or run_out)
        dest = run_dir / "item_embeddings.parquet"
    cat = Path(catalog) if catalog else run_dir / "data" / "catalog.parquet"
    if not cat.exists():
        raise LaneError(f"{cat}: no catalogue here; run `lane data prepare DATASET --out {run_dir}` or pass --catalog")
    return cat, dest


def embed_catalog(cfg, catalog: Path, dest: Path, quiet: bool, run_dir: Path | None) -> dict[str, Any]:
    """Title embeddings of ``catalog`` into ``dest`` (only the titles not embedded yet); the stage's manifest."""
    from lane_ray.pipeline.embed import embed_texts
    from lane_ray.progress import Stage

    with Stage("embed_catalog", run_dir, quiet=quiet) as st:
        manifest = embed_texts(catalog, dest, cfg.embed, cfg.ray)
        st.skipped = manifest["embedded_now"] == 0  # every title was current: keep the timing of the real run
        st.rows = manifest["embedded_now"]
        st.extra = {"titles_per_s": round(manifest["embedded_now"] / manifest["embed_seconds"], 1)
                    if manifest["embed_seconds"] else None, "reused": manifest["reused"]}
    return manifest


def share_cores(cfg, kwargs: dict[str, Any], resources: dict[str, float], actors: int, gpus: float) -> None:
    """Torch threads of CPU ``transformers`` actors when not configured: Ray gives an actor OMP_NUM_THREADS =
    its num_cpus (1); share the node's cores among the actors instead (1 thread ran at half the speed of 2
    on a 2-core node)."""
    if cfg.llm.backend == "transformers" and kwargs.get("num_threads") is None and not gpus:
        kwargs["num_threads"] = max(1, int(resources.get("CPU", 1) // max(1, actors)))


def extract_preferences(cfg, quiet: bool) -> dict[str, Any]:
    """LLM preferences of every user's train prefix into ``RUN/preferences.parquet`` (cached per user, history,
    model and prompt version), then their embeddings (``preferences.embed``); the stage's manifest."""
    from lane_ray.data import read_prepared
    from lane_ray.llm import backend_kwargs, model_identity
    from lane_ray.llm.preferences import settings_from_config
    from lane_ray.pipeline.cluster import init_ray
    from lane_ray.pipeline.preferences import run_preferences, user_histories
    from lane_ray.progress import Stage

    out = Path(cfg.run.out)
    kwargs, model_id = backend_kwargs(cfg.llm), model_identity(cfg.llm)
    pc = cfg.preferences
    share_cores(cfg, kwargs, init_ray(cfg.ray), pc.max_actors, pc.gpus_per_actor)
    with Stage("preferences", out, quiet=quiet) as st:
        prepared = read_prepared(out)
        users = user_histories(prepared.interactions, prepared.catalog, pc.max_users)
        settings = settings_from_config(pc, prepared.catalog)
        # vLLM runs as its own Ray Data job on GPU actors: the driver orchestrates it, in large batches
        vllm = cfg.llm.backend == "vllm"
        batch_size = pc.batch_size or (8192 if vllm else 32)
        manifest = run_preferences(users, out / "preferences.parquet", cfg.llm.backend, kwargs, settings, model_id,
                                   batch_size, pc.max_actors, pc.cpus_per_actor, pc.gpus_per_actor,
                                   use_ray=not vllm, niceness=pc.actor_niceness)
        st.skipped = manifest["extracted_now"] == 0
        st.rows = manifest["extracted_now"]
        st.extra = {k: manifest[k] for k in ("tokens_per_s", "users_per_s", "status") if k in manifest}
    if pc.embed:
        embed_preferences(cfg, out, quiet)
    return manifest


def embed_preferences(cfg, out: Path, quiet: bool) -> dict[str, Any]:
    """preferences.parquet -> (user_id, slot, text) -> preference_embeddings.parquet (incremental)."""
    from lane_ray.pipeline.embed import TextTable, embed_texts
    from lane_ray.pipeline.preferences import write_preference_texts
    from lane_ray.progress import Stage

    with Stage("embed_preferences", out, quiet=quiet) as st:
        texts = out / "preference_texts.parquet"
        write_preference_texts(out / "preferences.parquet", texts)
        manifest = embed_texts(texts, out / "preference_embeddings.parquet", cfg.embed, cfg.ray,
                               spec=TextTable(("user_id", "slot"), "text"))
        st.skipped = manifest["embedded_now"] == 0
        st.rows = manifest["embedded_now"]
        st.extra = {"reused": manifest["reused"]}
    return manifest


def explain_candidates(cfg, candidates: Path, quiet: bool) -> dict[str, Any]:
    """Explanations of the candidates' top ranks (``explain`` section) into the run directory, cached, with
    their checks in ``explanation_checks.json`` (the sentence encoder of ``embed.model`` reads the free text)."""
    from lane_ray.llm import backend_kwargs, model_identity
    from lane_ray.llm.explain import settings_from_config
    from lane_ray.pipeline.cluster import init_ray
    from lane_ray.pipeline.explain import load_requests, run_explanations
    from lane_ray.progress import Stage
    from lane_ray.text import TextEncoder

    out, ec = Path(cfg.run.out), cfg.explain
    settings = settings_from_config(cfg)
    with Stage("explain", out, quiet=quiet) as st:
        requests, controls, vocab = load_requests(out, candidates, ec.top_k, ec.max_users,
                                                  controls=ec.mode == "judge")
        kwargs, model_id = backend_kwargs(cfg.llm), model_identity(cfg.llm)
        share_cores(cfg, kwargs, {"CPU": float(os.cpu_count() or 1)}, ec.max_actors, 0.0)
        m = run_explanations(requests, out / "explanations.parquet", out / "explanation_checks.json",
                             cfg.llm.backend, kwargs, settings, model_id, ec.batch_size, ec.max_actors,
                             ec.cpus_per_actor, ec.gpus_per_actor, not_copied_threshold=ec.not_copied_threshold,
                             connect=lambda: init_ray(cfg.ray), niceness=ec.actor_niceness,
                             encoder=TextEncoder(cfg.embed.model, device="cpu"), vocab=vocab, controls=controls,
                             follows=ec.follows_attribution)
        st.skipped = m["explained_now"] == 0
        st.rows = m["explained_now"]
        st.extra = {k: m[k] for k in ("tokens_per_s", "seconds_per_explanation", "source") if k in m}
    return m


def train_features(cfg, variants: list[str], quiet: bool):
    """Data, title embeddings (when a title variant needs them) and preferences (lane variants) of the run
    directory: cached stages are skipped; preferences are extracted when missing."""
    from lane_ray.train.features import load_features

    out = Path(cfg.run.out)
    prepare_data(cfg, quiet)
    titles = any(v != "id" for v in variants)
    prefs = any(v.startswith("lane") for v in variants)
    if titles:
        catalog, dest = embedding_paths(str(out), None, cfg.run.out)
        embed_catalog(cfg, catalog, dest, quiet, out)
    if prefs:
        extract_preferences(cfg, quiet)
    return load_features(out, titles=titles, preferences=prefs, m=cfg.train.m)


def train_and_evaluate(cfg, quiet: bool, skip_current: bool = False, feats=None) -> dict[str, Any]:
    """Train ``cfg.train``'s backbone and variant with Ray Train, evaluate it on the test split (both protocols)
    and, for an aligned model, write every user's candidates with attributions; its ``metrics.json`` entry.
    With ``skip_current``, a variant whose training fingerprint and checkpoint are current is not retrained."""
    from lane_ray.models import load_checkpoint
    from lane_ray.pipeline.train import (
        evaluate_model,
        fit_record,
        metrics_key,
        train_variant,
        training_fingerprint,
        write_metrics,
    )
    from lane_ray.progress import Stage

    tc, out = cfg.train, Path(cfg.run.out)
    if feats is None:
        feats = train_features(cfg, [tc.variant], quiet)
    key = metrics_key(tc.backbone, tc.variant, tc.seed)
    fingerprint = training_fingerprint(tc, out)
    if skip_current and (out / "metrics.json").exists():
        prev = json.loads((out / "metrics.json").read_text()).get(key, {})
        if prev.get("fingerprint") == fingerprint and Path(prev.get("checkpoint", "")).joinpath("config.json").exists():
            for name in (f"train_{tc.backbone}_{tc.variant}", f"evaluate_{tc.backbone}_{tc.variant}"):
                with Stage(name, out, quiet=quiet) as st:
                    st.skipped = True
            return prev
    with Stage(f"train_{tc.backbone}_{tc.variant}", out, quiet=quiet) as st:
        from lane_ray.pipeline.train import EpochProgress, run_name
        from lane_ray.progress import expect, log

        if not quiet:
            log(f"train_{tc.backbone}_{tc.variant}: up to {tc.epochs} epochs, stopping after {tc.patience} without a "
                f"better validation NDCG@10")
        # one Ray Train checkpoint per epoch; the ETA runs to the epoch early stopping ends at, at the latest
        epochs = EpochProgress(out / "ray_train" / run_name(tc), tc.patience, tc.epochs)
        expect(tc.epochs - epochs.base, epochs, "epochs", epochs.bound,
               rate_key=f"epochs/train/{tc.backbone}/{tc.variant}/{tc.num_workers}")
        summary = train_variant(tc, cfg.ray, out, feats, quiet=quiet)
        st.rows = feats.split.num_users
        st.extra = {"epochs": summary["epochs"], "seconds_per_epoch": summary["seconds_per_epoch"],
                    "workers": tc.num_workers}
    model, _ = load_checkpoint(summary["checkpoint"])
    with Stage(f"evaluate_{tc.backbone}_{tc.variant}", out, quiet=quiet) as st:
        result = evaluate_model(model, feats, tc, tc.variant, tc.seed, faithfulness=model.cfg.align)
        result.update(fit_record(summary), checkpoint=summary["checkpoint"], fingerprint=fingerprint)
        if model.cfg.align:  # every user's top 10 (batch inference over the whole catalogue): lane explain's input
            from lane_ray.pipeline.train import write_candidates

            t0 = time.perf_counter()
            st.rows = write_candidates(model, feats, out / "candidates.parquet")
            st.extra = {"candidates_seconds": round(time.perf_counter() - t0, 3)}
        write_metrics(out / "metrics.json", key, result)
    return result



def ablation(cfg, backbones: list[str], variants: list[str], seeds: int, workers: int = 0,
             faithfulness: bool = True, quiet: bool = False) -> dict[str, Any]:
    """The ablation experiment (:func:`lane_ray.pipeline.experiment.run_ablation`) on the run's data, preparing the
    features its variants need; metrics.json's document."""
    from lane_ray.config import BACKBONES, VARIANTS
    from lane_ray.pipeline.experiment import run_ablation

    for flag, names, known in (("--backbones", backbones, BACKBONES), ("--variants", variants, VARIANTS)):
        for name in names:
            if name not in known:
                raise LaneError(f"{flag}: unknown {flag[2:-1]} {name!r} (choose from {', '.join(known)})")
    if seeds < 1:
        raise LaneError("--seeds must be >= 1")
    feats = train_features(cfg, variants, quiet)
    return run_ablation(cfg.train, cfg.ray, Path(cfg.run.out), feats, backbones, variants, seeds, workers,
                        faithfulness=faithfulness, quiet=quiet)


def run_pipeline(cfg, quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """The whole pipeline on ``cfg.run.out``: data, catalogue embedding, preferences (and their embeddings), the
    SASRec ``id`` and ``lane`` variants trained and evaluated, explanations for ``run.explain_users`` users, the
    report. Each stage is skipped when its output is current (``force``: prepare and train again). Returns
    ``{"run_dir", "report", "stats"}``."""
    from lane_ray.atomic import atomic_open
    from lane_ray.config import dump_config, with_values
    from lane_ray.progress import RunProgress, Stage, log
    from lane_ray.report import write_run_report
    from lane_ray.train.features import load_features

    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "config.yaml") as fh:
        fh.write(dump_config(cfg))
    plan = [s for s in RUN_STAGES if s != "explain" or cfg.run.explain_users]
    if not cfg.preferences.embed:
        plan.remove("embed_preferences")
    with RunProgress(out, plan):
        summary = prepare_data(cfg, quiet, force=force)
        catalog, dest = embedding_paths(str(out), None, cfg.run.out)
        embed_catalog(cfg, catalog, dest, quiet, out)
        extract_preferences(cfg, quiet)
        feats = load_features(out, titles=True, preferences=True, m=cfg.train.m)
        # the two SASRec variants the pipeline trains: the ID baseline and LANE (skipped when current)
        for variant in ("id", "lane"):
            vcfg = with_values(cfg, {"train.variant": variant, "train.backbone": "sasrec"})
            train_and_evaluate(vcfg, quiet, skip_current=not force, feats=feats)
        if cfg.run.explain_users:
            ecfg = with_values(cfg, {"explain.max_users": cfg.run.explain_users})
            explain_candidates(ecfg, out / "candidates.parquet", quiet)
        with Stage("report", out, quiet=quiet):
            report = write_run_report(out)
    s = summary["stats"]
    if not quiet:
        log(f"run complete: {out} ({s['users']} users, {s['items']} items, {s['interactions']} interactions); "
            f"report: {report}")
    return {"run_dir": out, "report": Path(report), "stats": s}


def evaluate_checkpoints(cfg, checkpoints: list[str | Path] | None = None, faithfulness: bool = False,
                         quiet: bool = False) -> dict[str, Any]:
    """Evaluate saved checkpoints (default: every one of ``RUN/checkpoints``) on the run's test split and record
    them in ``metrics.json``; rewrite ``candidates.parquet`` from the aligned model among them (the SASRec
    ``lane`` one when present). Returns ``{"results": {key: metrics}, "candidates": rows or None}``."""
    from lane_ray.models import load_checkpoint
    from lane_ray.pipeline.train import evaluate_model, metrics_key, write_candidates, write_metrics
    from lane_ray.progress import Stage
    from lane_ray.train.features import load_features

    out = Path(cfg.run.out)
    dirs = [Path(d) for d in checkpoints] if checkpoints else sorted(
        p.parent for p in (out / "checkpoints").glob("*/config.json"))
    if not dirs:
        raise LaneError(f"{out / 'checkpoints'}: no checkpoints; run `lane train --out {out}` first")
    loaded = [(d, *load_checkpoint(d)) for d in dirs]
    need_titles = any(m.cfg.item_mode == "title" for _, m, _ in loaded)
    need_prefs = any(m.cfg.align for _, m, _ in loaded)
    feats = load_features(out, titles=need_titles, preferences=need_prefs, m=cfg.train.m)
    results: dict[str, Any] = {}
    for d, model, meta in loaded:
        variant = meta.get("variant") or ("lane" if model.cfg.align else model.cfg.item_mode)
        seed = int(meta.get("seed", 0))
        if model.cfg.num_items != feats.num_items:
            raise LaneError(f"{d}: checkpoint has {model.cfg.num_items} items, the run's catalogue "
                            f"{feats.num_items}")
        key = metrics_key(model.cfg.backbone, variant, seed)
        with Stage(f"evaluate {key}", out, quiet=quiet):
            result = evaluate_model(model, feats, cfg.train, variant, seed, faithfulness=faithfulness)
        write_metrics(out / "metrics.json", key, result)
        results[key] = result
    candidates = None
    aligned = [(model, meta) for _, model, meta in loaded if model.cfg.align]
    if aligned:  # lane explain's input, with attributions: the SASRec lane model's when it is among them
        model, meta = min(aligned, key=lambda mm: (mm[1].get("variant") != "lane", mm[0].cfg.backbone != "sasrec"))
        key = metrics_key(model.cfg.backbone, meta.get("variant") or "lane", int(meta.get("seed", 0)))
        with Stage(f"candidates {key}", out, quiet=quiet) as st:
            st.rows = candidates = write_candidates(model, feats, out / "candidates.parquet")
    return {"results": results, "candidates": candidates}


__all__ = ["RUN_STAGES", "embed_catalog", "embed_preferences", "embedding_paths", "evaluate_checkpoints",
           "explain_candidates", "extract_preferences", "prepare_data", "run_pipeline", "share_cores",
           "train_and_evaluate", "train_features"]
