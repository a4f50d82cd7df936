"""The ``lane`` command line.

Every command takes ``--config FILE``, ``--out DIR`` and ``--set section.field=value`` overrides, shows
progress on stderr, and exits with status 2 and a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lane_ray.config import BACKBONES, VARIANTS
from lane_ray.errors import LaneError
from lane_ray.pipeline import stages

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


# `lane explain` flags and the explain.* fields they override (flags beat --set beats --config beats defaults)
EXPLAIN_FLAGS = {"mode": "mode", "max-users": "max_users", "top-k": "top_k", "batch-size": "batch_size",
                 "max-retries": "max_retries", "temperature": "temperature", "seed": "seed",
                 "budget-tokens": "budget_tokens", "max-why-tokens": "max_why_tokens",
                 "max-reason-tokens": "max_reason_tokens", "not-copied-threshold": "not_copied_threshold",
                 "actors": "max_actors", "cpus-per-actor": "cpus_per_actor", "gpus-per-actor": "gpus_per_actor"}


def _field_flags(p: argparse.ArgumentParser, section: str, flags: dict[str, str]) -> None:
    """One flag per config field of ``section``: its type, choices, description and default from the config."""
    import types
    import typing

    from lane_ray.config import LaneConfig

    model = LaneConfig.model_fields[section].annotation
    for flag, name in flags.items():
        f = model.model_fields[name]
        kind = f.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # int | None: the int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=None if choices else kind, choices=choices,
                       help=f"{f.description} ({section}.{name}, default {f.default})")


def _flag_values(args: argparse.Namespace, section: str, flags: dict[str, str]) -> dict[str, Any]:
    return {f"{section}.{name}": getattr(args, flag.replace("-", "_")) for flag, name in flags.items()}


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
    _field_flags(p, "explain", EXPLAIN_FLAGS)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("train", help="train one recommender variant with Ray Train (DDP), then evaluate it on test")
    _common(p)
    _dataset_args(p, positional=False)
    _train_args(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (train.num_workers, default 1)")
    p.add_argument("--variant", choices=VARIANTS, help="model variant (train.variant, default lane)")
    p.add_argument("--backbone", choices=BACKBONES, help="sequence encoder (train.backbone, default sasrec)")
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
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants (default all)")
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
    from lane_ray.storage import open_run

    # an absolute local folder; s3:// / gs://: a local staging folder kept in sync with it
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


def cmd_data_prepare(args: argparse.Namespace) -> int:
    if args.out is None:
        raise LaneError("lane data prepare: --out DIR is required")
    cfg = _config(args)
    summary = stages.prepare_data(cfg, args.quiet, force=True)
    s = summary["stats"]
    print(f"{Path(cfg.run.out) / 'data'}: {s['users']} users, {s['items']} items, {s['interactions']} interactions")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from lane_ray.data.synth import generate, percent_logger
    from lane_ray.progress import Stage

    if args.out is None:
        raise LaneError("lane data synth: --out DIR is required")
    cfg = _config(args, **{"synth.items": args.items, "synth.users": args.users, "synth.seed": args.seed})
    with Stage("synth", cfg.run.out, quiet=args.quiet) as st:
        summary = generate(cfg.synth, cfg.run.out, progress=None if args.quiet else percent_logger())
        st.rows = summary["interactions"]
    print(f"{Path(cfg.run.out) / 'data'}: {summary['users']} users, {summary['items']} items, "
          f"{summary['interactions']} interactions")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    cfg = _config(args)
    catalog, dest = stages.embedding_paths(args.out, args.catalog, cfg.run.out)
    m = stages.embed_catalog(cfg, catalog, dest, args.quiet, dest.parent)
    print(f"{dest}: {m['rows']} embeddings (dim {m['dim']}): {m['embedded_now']} new, {m['reused']} reused, "
          f"{m['rejected']} rejected")
    return 0


def cmd_preferences(args: argparse.Namespace) -> int:
    cfg = _config(args, **{"preferences.max_users": args.max_users})
    stages.prepare_data(cfg, args.quiet)
    m = stages.extract_preferences(cfg, args.quiet)
    status = ", ".join(f"{k} {v}" for k, v in sorted(m["status"].items()))
    print(f"{Path(cfg.run.out) / 'preferences.parquet'}: {m['users']} users ({m['extracted_now']} extracted now, "
          f"{m['cached']} cached); status: {status}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from lane_ray.llm.explain_checks import format_check_rates

    cfg = _config(args, **_flag_values(args, "explain", EXPLAIN_FLAGS))  # pydantic validates them all
    out = Path(cfg.run.out)
    m = stages.explain_candidates(cfg, Path(args.candidates), args.quiet)
    print(f"{out / 'explanations.parquet'}: {m['rows']} explanations ({m['explained_now']} generated now, "
          f"{m['cached']} cached); source {m['source']}; format_ok {m['format_ok']}/{m['rows']}; checks: "
          f"{format_check_rates(m)}")
    return 0


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.epochs": args.epochs, "train.patience": args.patience,
            "train.num_workers": getattr(args, "workers", None) if args.command == "train" else None,
            "train.variant": getattr(args, "variant", None), "train.backbone": getattr(args, "backbone", None),
            "train.seed": getattr(args, "seed", None)}


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
    from lane_ray.index import build_for_run

    params = ({"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction} if args.kind == "hnsw"
              else {"nlist": args.nlist})
    out, meta = build_for_run(args.run, args.checkpoint, args.kind, args.index_out, quiet=args.quiet, **params)
    print(f"{out}: {meta['kind']} index of {meta['items']} items x {meta['dim']} in {meta['build_seconds']} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    flags = {"serve.port": args.port, "serve.host": args.host, "serve.checkpoint": args.checkpoint}
    cfg = _config(args, **flags)  # validates everything before Ray starts
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    app = importlib.import_module("serve.app")  # the Ray Serve app package, beside the library
    return app.serve_forever(cfg, args.run, {"run_dir": args.run, "config": args.config, "set": overrides},
                             on_ready=lambda url: print(url, flush=True))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args, **_train_overrides(args))
    r = stages.train_and_evaluate(cfg, args.quiet)
    tc = cfg.train
    print(f"{r['checkpoint']}: {tc.backbone}/{tc.variant}/seed{tc.seed} {r['epochs']} epochs "
          f"({r['seconds_per_epoch']:.2f} s/epoch, {tc.num_workers} worker(s)); test ndcg@10 full "
          f"{r['full']['ndcg@10']:.4f}, sampled100 {r['sampled100']['ndcg@10']:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    r = stages.evaluate_checkpoints(cfg, args.checkpoint, faithfulness=args.faithfulness, quiet=args.quiet)
    for key, result in r["results"].items():
        f = result.get("faithfulness")
        extra = f"; faithfulness {f['top_hurts_more']:.3f} of {f['users']} users" if f and f["users"] else ""
        print(f"{key}: test ndcg@10 full {result['full']['ndcg@10']:.4f}, sampled100 "
              f"{result['sampled100']['ndcg@10']:.4f} ({result['eval_seconds']:.1f} s){extra}")
    if r["candidates"] is not None:
        print(f"{Path(cfg.run.out) / 'candidates.parquet'}: {r['candidates']} candidates with attributions")
    return 0


def cmd_experiment_ablation(args: argparse.Namespace) -> int:
    from lane_ray.pipeline.experiment import run_ablation

    cfg = _config(args, **_train_overrides(args))
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for b in backbones:
        if b not in BACKBONES:
            raise LaneError(f"--backbones: unknown backbone {b!r} (choose from {', '.join(BACKBONES)})")
    for v in variants:
        if v not in VARIANTS:
            raise LaneError(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    if args.seeds < 1:
        raise LaneError("--seeds must be >= 1")
    out = Path(cfg.run.out)
    feats = stages.train_features(cfg, variants, args.quiet)
    run_ablation(cfg.train, cfg.ray, out, feats, backbones, variants, args.seeds, args.workers,
                 faithfulness=not args.no_faithfulness, quiet=args.quiet)
    print(f"{out / 'metrics.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0




def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline on one run directory (:func:`lane_ray.pipeline.stages.run_pipeline`)."""
    r = stages.run_pipeline(_config(args), args.quiet, force=args.force)
    print(r["run_dir"])
    print(r["report"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print a run directory's progress view (RUN/progress.json), once or every --watch seconds."""
    from lane_ray.progress import format_progress, read_progress

    while True:
        doc = read_progress(args.run_dir)
        print(json.dumps(doc) if args.json else format_progress(doc), flush=True)
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
