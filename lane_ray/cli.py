"""The ``lane`` command line.

Every command takes ``--config FILE``, ``--out DIR`` and ``--set section.field=value`` overrides, shows
progress on stderr, and exits with status 2 and a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lane_ray.errors import LaneError

FORMATS = ["movielens", "recbole", "amazon", "steam", "csv", "parquet"]


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file (sections as in lane_ray.config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.user_k_core=5 (repeatable)")
    p.add_argument("--out", metavar="DIR", default=out_default,
                   help="run directory to write into" + (f" (default {out_default})" if out_default else ""))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _dataset_args(p: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        p.add_argument("dataset", metavar="DATASET", help="registered name (ml-100k, ml-1m, amazon-beauty, "
                       "steam) or a path to a file or directory")
    else:
        p.add_argument("--dataset", metavar="DATASET", help="registered name or path (default: config, ml-100k)")
    p.add_argument("--format", choices=FORMATS, help="format of a dataset given by path (detected when omitted)")


def _group(sub: Any, name: str, help: str, dest: str) -> Any:
    """A command with its own required subcommands (``lane data ...``, ``lane experiment ...``)."""
    sub_sub = sub.add_parser(name, help=help).add_subparsers(dest=dest, metavar="SUBCOMMAND")
    sub_sub.required = True
    return sub_sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lane", description="LANE-Ray: explainable sequential recommendation "
                                     "on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run the whole pipeline (default: ml-100k with the CPU models)")
    _common(p)
    _dataset_args(p, positional=False)
    p.add_argument("--force", action="store_true", help="recompute stages even when their output is current")
    p.set_defaults(func=cmd_run)

    dsub = _group(sub, "data", "dataset commands: stats, prepare, synth", "data_command")
    p = dsub.add_parser("stats", help="statistics of a dataset after preprocessing")
    _common(p)
    _dataset_args(p, positional=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_data_stats)
    p = dsub.add_parser("prepare", help="write the canonical tables into OUT/data/")
    _common(p)
    _dataset_args(p, positional=True)
    p.set_defaults(func=cmd_data_prepare)
    p = dsub.add_parser("synth", help="generate a synthetic dataset into OUT/data/")
    _common(p)
    p.add_argument("--items", type=int, help="number of items (default: config synth.items)")
    p.add_argument("--users", type=int, help="number of users (default: config synth.users)")
    p.add_argument("--seed", type=int, help="random seed (default: config synth.seed)")
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("embed", help="embed catalogue titles with Ray Data (incremental, resumable)")
    _common(p)
    p.add_argument("--catalog", metavar="PATH", help="catalogue Parquet (default: OUT/data/catalog.parquet)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("preferences", help="LLM preferences for every user's train prefix (Ray Data, cached)")
    _common(p)
    _dataset_args(p, positional=False)
    p.add_argument("--max-users", type=int, help="only the first N users by id")
    p.set_defaults(func=cmd_preferences)

    p = sub.add_parser("explain", help="explanations that state the recommender's attribution, with checks that "
                       "they follow it (Ray Data, cached)")
    _common(p)
    p.add_argument("--candidates", metavar="FILE", required=True,
                   help="candidates.parquet with user_id, item_id, rank, score and the attribution columns "
                   "pref_contrib, pref_share, history_item_ids, history_contrib (optional hit_rate), as `lane "
                   "evaluate` writes it; preferences come from OUT/preferences.parquet, titles from OUT/data/")
    p.add_argument("--mode", choices=["grounded", "judge"], help="grounded: the LLM words the model's reasons; "
                   "judge: it also gives fit and likelihood itself (explain.mode, default grounded)")
    # each flag overrides its explain.* config field (unset = config, whose defaults are shown)
    p.add_argument("--max-users", type=int, help="only the first N users of the candidates by id (explain.max_users)")
    p.add_argument("--top-k", type=int, help="explain ranks 1..K of each user (explain.top_k, default 5)")
    p.add_argument("--batch-size", type=int, help="explanations per generation call (explain.batch_size, default 16)")
    p.add_argument("--max-retries", type=int,
                   help="re-sampling rounds for unparseable replies (explain.max_retries, default 1)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (explain.temperature, "
                   "default 0.3)")
    p.add_argument("--seed", type=int, help="sampling seed; retries add 1000 per round (explain.seed, default 0)")
    p.add_argument("--budget-tokens", type=int,
                   help="history tokens in the prompt, newest kept (explain.budget_tokens, default 90)")
    p.add_argument("--max-why-tokens", type=int,
                   help="token cap of the 'because' clause (explain.max_why_tokens, default 12)")
    p.add_argument("--max-reason-tokens", type=int,
                   help="token cap of the reason's free body (explain.max_reason_tokens, default 20)")
    p.add_argument("--not-copied-threshold", type=float,
                   help="minimum share of an explanation's sentences found in no other user's "
                   "(explain.not_copied_threshold, default 0.5)")
    p.add_argument("--actors", type=int,
                   help="maximum LLM actors; CPU: each holds a model copy (explain.max_actors, default 1)")
    p.add_argument("--cpus-per-actor", type=float,
                   help="logical CPUs per LLM actor (explain.cpus_per_actor, default 1)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per LLM actor (explain.gpus_per_actor, default 0)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("train", help="train one recommender variant with Ray Train (DDP), then evaluate it on test")
    _common(p)
    _dataset_args(p, positional=False)
    _train_args(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (train.num_workers, default 1)")
    p.add_argument("--variant", choices=VARIANT_CHOICES, help="model variant (train.variant, default lane)")
    p.add_argument("--backbone", choices=BACKBONE_CHOICES, help="sequence encoder (train.backbone, default sasrec)")
    p.add_argument("--seed", type=int, help="seed (train.seed, default 0)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate trained checkpoints on test (full ranking and sampled-100)")
    _common(p)
    p.add_argument("--checkpoint", metavar="DIR", action="append",
                   help="checkpoint directory (repeatable; default: every one under OUT/checkpoints/)")
    p.add_argument("--faithfulness", action="store_true",
                   help="also measure whether removing the top-weight preference hurts more than a random one")
    p.set_defaults(func=cmd_evaluate)

    esub = _group(sub, "experiment", "experiments: ablation", "experiment")
    p = esub.add_parser("ablation", help="id / title / lane / lane-shuffled for each backbone over seeds")
    _common(p)
    _dataset_args(p, positional=False)
    _train_args(p)
    p.add_argument("--backbones", default="sasrec", help="comma-separated: sasrec,gru4rec,bert4rec,diffurec")
    p.add_argument("--variants", default=",".join(VARIANT_CHOICES), help="comma-separated variants (default all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    p.add_argument("--workers", type=int, default=0,
                   help="0: train in-process (the same epoch functions, no Ray Train overhead); N: Ray Train with N "
                   "workers")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness measurement")
    p.set_defaults(func=cmd_experiment_ablation)

    p = sub.add_parser("serve", help="start the Ray Serve app (ranking + explanations) on a run directory")
    _common(p)
    p.add_argument("--run", metavar="DIR", default="runs/default",
                   help="run directory with data, embeddings, preferences and checkpoints (default runs/default)")
    p.add_argument("--port", type=int, help="HTTP port (serve.port, default 8000)")
    p.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    p.add_argument("--checkpoint", help="checkpoint to serve: a name under RUN/checkpoints or a path "
                   "(serve.checkpoint, default lane)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", help="run a lane command as a job on a Ray cluster (ray job submit)",
                       description="lane submit --address http://HEAD:8265 -- run --out s3://bucket/runs/x")
    p.add_argument("--address", default=None, help="the cluster's dashboard / job server, http://HOST:8265 "
                   "(default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="folder shipped to the cluster as the job's working directory "
                   "(default: here; .venv, .git, runs/ and caches are left out)")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without waiting")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the job (default: no limit)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the lane command and its arguments")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("report", help="markdown report with PNG plots of a run directory's artifacts")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="progress of a `lane run` (stages, their progress, ETA) from RUN/progress.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--json", action="store_true", help="print the progress document as one JSON line")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until the run ends")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("index", help="build the serving app's ANN index (faiss) of a checkpoint's item table")
    _common(p)
    p.add_argument("--run", metavar="DIR", default="runs/default", help="run directory (default runs/default)")
    p.add_argument("--checkpoint", default="lane",
                   help="a name under RUN/checkpoints or a path (default lane, what `lane run` trains)")
    p.add_argument("--kind", choices=["hnsw", "ivf"], default="hnsw", help="index type (default hnsw)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW build breadth (default 80)")
    p.add_argument("--nlist", type=int, help="IVF lists (default 4 * sqrt(items))")
    p.add_argument("--index-out", metavar="DIR", help="where to write (default RUN/index/<checkpoint>)")
    p.set_defaults(func=cmd_index)
    return parser


VARIANT_CHOICES = ["id", "title", "lane", "lane-shuffled"]
BACKBONE_CHOICES = ["sasrec", "gru4rec", "bert4rec", "diffurec"]


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="maximum epochs (train.epochs, default 200)")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (train.patience, default 10)")


def _config(args: argparse.Namespace, **flags: Any):
    from lane_ray.config import load_config

    values = {k: v for k, v in flags.items() if v is not None}
    if getattr(args, "dataset", None) is not None:
        values["data.dataset"] = args.dataset
    if getattr(args, "format", None) is not None:
        values["data.format"] = args.format
    if getattr(args, "out", None) is not None and not args.out.endswith(".parquet"):
        values["run.out"] = args.out
    cfg = load_config(args.config, args.overrides, values)
    from lane_ray.storage import is_uri, open_run

    if is_uri(cfg.run.out):  # s3:// / gs://: work in a local staging folder kept in sync with it
        cfg.run.out = open_run(cfg.run.out, cfg.run.stage_dir)
    return cfg


def cmd_data_stats(args: argparse.Namespace) -> int:
    from lane_ray.data import load_dataset
    from lane_ray.progress import Stage

    cfg = _config(args)
    with Stage(f"load {cfg.data.dataset}", quiet=args.quiet or args.json):
        prepared = load_dataset(cfg.data)
    stats = {"dataset": prepared.name, **prepared.stats(), "preprocessing": prepared.report}
    if args.json:
        print(json.dumps(stats))
    else:
        for k, v in stats.items():
            print(f"{k:>14}: {v}")
    return 0


def _prepare(cfg, quiet: bool, force: bool = False) -> dict[str, Any]:
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


def cmd_data_prepare(args: argparse.Namespace) -> int:
    if args.out is None:
        raise LaneError("lane data prepare: --out DIR is required")
    cfg = _config(args)
    summary = _prepare(cfg, args.quiet, force=True)
    s = summary["stats"]
    print(f"{Path(cfg.run.out) / 'data'}: {s['users']} users, {s['items']} items, {s['interactions']} interactions")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from lane_ray.data.synth import generate
    from lane_ray.progress import Stage, log

    if args.out is None:
        raise LaneError("lane data synth: --out DIR is required")
    cfg = _config(args, **{"synth.items": args.items, "synth.users": args.users, "synth.seed": args.seed})
    last: dict[str, int] = {}

    def progress(kind: str, done: int, total: int) -> None:
        pct = 100 * done // total
        if not args.quiet and (pct >= last.get(kind, -10) + 10 or done == total):
            last[kind] = pct
            log(f"synth: {kind} {done:,}/{total:,} ({pct}%)")

    with Stage("synth", cfg.run.out, quiet=args.quiet) as st:
        summary = generate(cfg.synth, cfg.run.out, progress=progress)
        st.rows = summary["interactions"]
    print(f"{Path(cfg.run.out) / 'data'}: {summary['users']} users, {summary['items']} items, "
          f"{summary['interactions']} interactions")
    return 0


def _embed_paths(out: str | None, catalog: str | None, run_out: str) -> tuple[Path, Path]:
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


def _embed(cfg, catalog: Path, dest: Path, quiet: bool, run_dir: Path | None) -> dict[str, Any]:
    from lane_ray.pipeline.embed import embed_texts
    from lane_ray.progress import Stage

    with Stage("embed_catalog", run_dir, quiet=quiet) as st:
        manifest = embed_texts(catalog, dest, cfg.embed, cfg.ray)
        st.skipped = manifest["embedded_now"] == 0  # every title was current: keep the timing of the real run
        st.rows = manifest["embedded_now"]
        st.extra = {"titles_per_s": round(manifest["embedded_now"] / manifest["embed_seconds"], 1)
                    if manifest["embed_seconds"] else None, "reused": manifest["reused"]}
    return manifest


def cmd_embed(args: argparse.Namespace) -> int:
    cfg = _config(args)
    catalog, dest = _embed_paths(args.out, args.catalog, cfg.run.out)
    m = _embed(cfg, catalog, dest, args.quiet, dest.parent)
    print(f"{dest}: {m['rows']} embeddings (dim {m['dim']}): {m['embedded_now']} new, {m['reused']} reused, "
          f"{m['rejected']} rejected")
    return 0


def _share_cores(cfg, kwargs: dict[str, Any], resources: dict[str, float], actors: int, gpus: float) -> None:
    """Torch threads of CPU ``transformers`` actors when not configured: Ray gives an actor OMP_NUM_THREADS =
    its num_cpus (1); share the node's cores among the actors instead (1 thread ran at half the speed of 2
    on a 2-core node)."""
    if cfg.llm.backend == "transformers" and kwargs.get("num_threads") is None and not gpus:
        kwargs["num_threads"] = max(1, int(resources.get("CPU", 1) // max(1, actors)))


def _preferences(cfg, quiet: bool) -> dict[str, Any]:
    from lane_ray.data import read_prepared
    from lane_ray.llm import backend_kwargs, model_identity
    from lane_ray.llm.preferences import settings_from_config
    from lane_ray.pipeline.cluster import init_ray
    from lane_ray.pipeline.preferences import run_preferences, user_histories
    from lane_ray.progress import Stage

    out = Path(cfg.run.out)
    kwargs, model_id = backend_kwargs(cfg.llm), model_identity(cfg.llm)
    pc = cfg.preferences
    _share_cores(cfg, kwargs, init_ray(cfg.ray), pc.max_actors, pc.gpus_per_actor)
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
        _embed_preferences(cfg, out, quiet)
    return manifest


def _embed_preferences(cfg, out: Path, quiet: bool) -> dict[str, Any]:
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


def cmd_preferences(args: argparse.Namespace) -> int:
    cfg = _config(args, **{"preferences.max_users": args.max_users})
    _prepare(cfg, args.quiet)
    m = _preferences(cfg, args.quiet)
    status = ", ".join(f"{k} {v}" for k, v in sorted(m["status"].items()))
    print(f"{Path(cfg.run.out) / 'preferences.parquet'}: {m['users']} users ({m['extracted_now']} extracted now, "
          f"{m['cached']} cached); status: {status}")
    return 0


def _explain(cfg, candidates: Path, quiet: bool) -> dict[str, Any]:
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
        _share_cores(cfg, kwargs, {"CPU": float(os.cpu_count() or 1)}, ec.max_actors, 0.0)
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


def format_check_rates(m: dict[str, Any]) -> str:
    """``name rate (chance c)`` for every check rate of an ``explanation_checks.json`` summary."""
    parts = []
    for k, v in m["rates"].items():
        if v is None:
            continue
        c = m.get("chance", {}).get(k)
        parts.append(f"{k} {v:.2f}" + (f" (chance {c:.2f})" if c is not None else ""))
    return ", ".join(parts)


def cmd_explain(args: argparse.Namespace) -> int:
    # flags beat --set beats --config beats defaults; pydantic validates them all (one-line ConfigError)
    cfg = _config(args, **{
        "explain.mode": args.mode,
        "explain.top_k": args.top_k, "explain.max_users": args.max_users, "explain.batch_size": args.batch_size,
        "explain.max_retries": args.max_retries, "explain.temperature": args.temperature,
        "explain.seed": args.seed, "explain.budget_tokens": args.budget_tokens,
        "explain.max_why_tokens": args.max_why_tokens, "explain.max_reason_tokens": args.max_reason_tokens,
        "explain.not_copied_threshold": args.not_copied_threshold, "explain.max_actors": args.actors,
        "explain.cpus_per_actor": args.cpus_per_actor, "explain.gpus_per_actor": args.gpus_per_actor})
    out = Path(cfg.run.out)
    m = _explain(cfg, Path(args.candidates), args.quiet)
    print(f"{out / 'explanations.parquet'}: {m['rows']} explanations ({m['explained_now']} generated now, "
          f"{m['cached']} cached); source {m['source']}; format_ok {m['format_ok']}/{m['rows']}; checks: "
          f"{format_check_rates(m)}")
    return 0


def _train_features(cfg, variants: list[str], quiet: bool):
    """Data, title embeddings (when a title variant needs them) and preferences (lane variants) of the run
    directory: cached stages are skipped; preferences are extracted when missing."""
    from lane_ray.train.features import load_features

    out = Path(cfg.run.out)
    _prepare(cfg, quiet)
    titles = any(v != "id" for v in variants)
    prefs = any(v.startswith("lane") for v in variants)
    if titles:
        catalog, dest = _embed_paths(str(out), None, cfg.run.out)
        _embed(cfg, catalog, dest, quiet, out)
    if prefs:
        _preferences(cfg, quiet)
    return load_features(out, titles=titles, preferences=prefs, m=cfg.train.m)


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.epochs": args.epochs, "train.patience": args.patience,
            "train.num_workers": getattr(args, "workers", None) if args.command == "train" else None,
            "train.variant": getattr(args, "variant", None), "train.backbone": getattr(args, "backbone", None),
            "train.seed": getattr(args, "seed", None)}


def _train_and_evaluate(cfg, quiet: bool, skip_current: bool = False, feats=None) -> dict[str, Any]:
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
        feats = _train_features(cfg, [tc.variant], quiet)
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


def cmd_submit(args: argparse.Namespace) -> int:
    """`lane submit`: submit the lane command after `--` (lane_ray.submit), then follow it to its end."""
    from lane_ray.submit import NOT_JOBS, submit, wait

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command and command[0] not in NOT_JOBS:
        build_parser().parse_args(command)  # refuse a bad command here, not on the cluster
    job_id = submit(command, args.address, args.working_dir, args.job_id)
    print(job_id, flush=True)
    if args.no_wait:
        return 0
    result = wait(job_id, args.address, args.timeout)
    print(f"{job_id}: {result.status}", flush=True)
    return 0 if result.succeeded else 1


def cmd_report(args: argparse.Namespace) -> int:
    from lane_ray.report import write_run_report
    from lane_ray.storage import open_run

    print(write_run_report(open_run(args.run_dir), args.out))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from lane_ray.progress import log
    from serve.core import resolve_checkpoint
    from serve.index import build_for_checkpoint

    run = Path(args.run)
    ckpt = resolve_checkpoint(run, args.checkpoint)
    out = Path(args.index_out) if args.index_out else run / "index" / ckpt.name
    if not args.quiet:
        log(f"index: building a {args.kind} index of {ckpt.name}'s item table")
    params = ({"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction} if args.kind == "hnsw"
              else {"nlist": args.nlist})
    meta = build_for_checkpoint(ckpt, out, args.kind, **params)
    print(f"{out}: {meta['kind']} index of {meta['items']} items x {meta['dim']} in {meta['build_seconds']} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from lane_ray.errors import DataError
    from lane_ray.pipeline.cluster import init_ray
    from lane_ray.progress import log

    flags = {"serve.port": args.port, "serve.host": args.host, "serve.checkpoint": args.checkpoint}
    cfg = _config(args, **flags)  # validates everything before Ray starts
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise DataError("no checkpoints in this run directory (run `lane run` or `lane train` first)", file=run)
    if cfg.serve.throughput_optimized:
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # read by the cluster init_ray may start
    init_ray(cfg.ray)
    from ray import serve

    from serve.app import build_app, wait_healthy

    s = cfg.serve
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    app = build_app({"run_dir": str(run), "config": args.config, "set": overrides})
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(app, name="lane", route_prefix="/", blocking=False)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    url = f"http://{host}:{s.port}/"
    wait_healthy(url)
    log(f"serve: ready ({url}docs for the API); Ctrl-C stops it")
    print(url, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args, **_train_overrides(args))
    r = _train_and_evaluate(cfg, args.quiet)
    tc = cfg.train
    print(f"{r['checkpoint']}: {tc.backbone}/{tc.variant}/seed{tc.seed} {r['epochs']} epochs "
          f"({r['seconds_per_epoch']:.2f} s/epoch, {tc.num_workers} worker(s)); test ndcg@10 full "
          f"{r['full']['ndcg@10']:.4f}, sampled100 {r['sampled100']['ndcg@10']:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lane_ray.models import load_checkpoint
    from lane_ray.pipeline.train import evaluate_model, metrics_key, write_metrics
    from lane_ray.progress import Stage
    from lane_ray.train.features import load_features

    cfg = _config(args)
    out = Path(cfg.run.out)
    dirs = [Path(d) for d in args.checkpoint] if args.checkpoint else sorted(
        p.parent for p in (out / "checkpoints").glob("*/config.json"))
    if not dirs:
        raise LaneError(f"{out / 'checkpoints'}: no checkpoints; run `lane train --out {out}` first")
    loaded = [(d, *load_checkpoint(d)) for d in dirs]
    need_titles = any(m.cfg.item_mode == "title" for _, m, _ in loaded)
    need_prefs = any(m.cfg.align for _, m, _ in loaded)
    feats = load_features(out, titles=need_titles, preferences=need_prefs, m=cfg.train.m)
    for d, model, meta in loaded:
        variant = meta.get("variant") or ("lane" if model.cfg.align else model.cfg.item_mode)
        seed = int(meta.get("seed", 0))
        if model.cfg.num_items != feats.num_items:
            raise LaneError(f"{d}: checkpoint has {model.cfg.num_items} items, the run's catalogue "
                            f"{feats.num_items}")
        key = metrics_key(model.cfg.backbone, variant, seed)
        with Stage(f"evaluate {key}", out, quiet=args.quiet):
            result = evaluate_model(model, feats, cfg.train, variant, seed, faithfulness=args.faithfulness)
        write_metrics(out / "metrics.json", key, result)
        f = result.get("faithfulness")
        extra = f"; faithfulness {f['top_hurts_more']:.3f} of {f['users']} users" if f and f["users"] else ""
        print(f"{key}: test ndcg@10 full {result['full']['ndcg@10']:.4f}, sampled100 "
              f"{result['sampled100']['ndcg@10']:.4f} ({result['eval_seconds']:.1f} s){extra}")
    aligned = [(model, meta) for _, model, meta in loaded if model.cfg.align]
    if aligned:  # lane explain's input, with attributions: the SASRec lane model's when it is among them
        from lane_ray.pipeline.train import write_candidates

        model, meta = min(aligned, key=lambda mm: (mm[1].get("variant") != "lane", mm[0].cfg.backbone != "sasrec"))
        key = metrics_key(model.cfg.backbone, meta.get("variant") or "lane", int(meta.get("seed", 0)))
        with Stage(f"candidates {key}", out, quiet=args.quiet) as st:
            st.rows = write_candidates(model, feats, out / "candidates.parquet")
        print(f"{out / 'candidates.parquet'}: {st.rows} candidates with attributions")
    return 0


def cmd_experiment_ablation(args: argparse.Namespace) -> int:
    from lane_ray.pipeline.experiment import run_ablation

    cfg = _config(args, **_train_overrides(args))
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for b in backbones:
        if b not in BACKBONE_CHOICES:
            raise LaneError(f"--backbones: unknown backbone {b!r} (choose from {', '.join(BACKBONE_CHOICES)})")
    for v in variants:
        if v not in VARIANT_CHOICES:
            raise LaneError(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANT_CHOICES)})")
    if args.seeds < 1:
        raise LaneError("--seeds must be >= 1")
    out = Path(cfg.run.out)
    feats = _train_features(cfg, variants, args.quiet)
    run_ablation(cfg.train, cfg.ray, out, feats, backbones, variants, args.seeds, args.workers,
                 faithfulness=not args.no_faithfulness, quiet=args.quiet)
    print(f"{out / 'metrics.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0


RUN_STAGES = ["data", "embed_catalog", "preferences", "embed_preferences", "train_sasrec_id", "evaluate_sasrec_id",
              "train_sasrec_lane", "evaluate_sasrec_lane", "explain", "report"]


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline on one run directory; each stage is skipped when its output is current. Progress of
    every stage is shown in one view (stderr, RUN/progress.json, `lane status RUN`)."""
    from lane_ray.atomic import atomic_open
    from lane_ray.config import dump_config
    from lane_ray.progress import RunProgress, Stage, log
    from lane_ray.report import write_run_report
    from lane_ray.train.features import load_features

    cfg = _config(args)
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "config.yaml") as fh:
        fh.write(dump_config(cfg))
    plan = [s for s in RUN_STAGES if s != "explain" or cfg.run.explain_users]
    if not cfg.preferences.embed:
        plan.remove("embed_preferences")
    with RunProgress(out, plan):
        summary = _prepare(cfg, args.quiet, force=args.force)
        catalog, dest = _embed_paths(str(out), None, cfg.run.out)
        _embed(cfg, catalog, dest, args.quiet, out)
        _preferences(cfg, args.quiet)
        feats = load_features(out, titles=True, preferences=True, m=cfg.train.m)
        # the two SASRec variants the pipeline trains: the ID baseline and LANE (skipped when current)
        for variant in ("id", "lane"):
            vcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"variant": variant,
                                                                                 "backbone": "sasrec"})})
            _train_and_evaluate(vcfg, args.quiet, skip_current=not args.force, feats=feats)
        if cfg.run.explain_users:
            ecfg = cfg.model_copy(update={"explain": cfg.explain.model_copy(
                update={"max_users": cfg.run.explain_users})})
            _explain(ecfg, out / "candidates.parquet", args.quiet)
        with Stage("report", out, quiet=args.quiet):
            report = write_run_report(out)
    s = summary["stats"]
    if not args.quiet:
        log(f"run complete: {out} ({s['users']} users, {s['items']} items, {s['interactions']} interactions); "
            f"report: {report}")
    print(out)
    print(report)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print a run directory's progress view (RUN/progress.json), once or every --watch seconds."""
    from lane_ray.progress import format_progress
    from lane_ray.storage import join_uri, read_text, redact

    path = join_uri(args.run_dir, "progress.json")
    while True:
        try:
            doc = json.loads(read_text(path))
        except FileNotFoundError:
            raise LaneError(f"{redact(path)}: no progress file; is this a run directory of `lane run`?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LaneError(f"{redact(path)}: not a progress file ({exc})") from None
        if not isinstance(doc, dict):
            raise LaneError(f"{redact(path)}: not a progress file (a JSON {type(doc).__name__})")
        if args.json:
            print(json.dumps(doc))
        else:
            print(format_progress(doc), flush=True)
        if not args.watch or doc.get("state") != "running":
            return 0
        time.sleep(args.watch)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lane_ray.storage import close_all

    try:
        try:
            return int(args.func(args) or 0)
        finally:
            close_all()  # a run directory on s3:// / gs:// gets what this command finished, also when it failed
    except LaneError as exc:
        print(f"lane: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lane: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
