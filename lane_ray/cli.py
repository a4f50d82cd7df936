"""The ``lane`` command line.

Every command takes ``--config FILE``, ``--out DIR`` and ``--set section.field=value`` overrides, shows
progress on stderr, and exits with status 2 and a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from lane_ray.config import VARIANTS
from lane_ray.errors import LaneError
from lane_ray.pipeline import stages
from lane_ray.submit import SUBMIT_OPTIONS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file (sections as in lane_ray.config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.user_k_core=5 (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run directory to write into (default: config run.out)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _dataset_args(p: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        p.add_argument("dataset", metavar="DATASET", help="registered name (ml-100k, ml-1m, amazon-beauty, "
                       "steam) or a path to a file or directory")
    _field_flags(p, {"format": "data.format"} if positional else DATA_FLAGS)


# flags that set one config field each ("section.field"): type, choices, help and default come from the field
EXPLAIN_FLAGS = {f: f"explain.{f.replace('-', '_')}" for f in (
    "mode", "max-users", "top-k", "batch-size", "max-retries", "temperature", "seed", "budget-tokens",
    "max-why-tokens", "max-reason-tokens", "not-copied-threshold", "cpus-per-actor", "gpus-per-actor")}
EXPLAIN_FLAGS["actors"] = "explain.max_actors"
DATA_FLAGS = {"dataset": "data.dataset", "format": "data.format"}
TRAIN_FLAGS = {"epochs": "train.epochs", "patience": "train.patience"}
MODEL_FLAGS = {"workers": "train.num_workers", "variant": "train.variant", "backbone": "train.backbone",
               "seed": "train.seed"}
SERVE_FLAGS = {"port": "serve.port", "host": "serve.host", "checkpoint": "serve.checkpoint"}
PREFERENCE_FLAGS = {"max-users": "preferences.max_users"}
SYNTH_FLAGS = {"items": "synth.items", "users": "synth.users", "seed": "synth.seed"}


def _field_flags(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """One flag per config field: its type, choices, description and default from the config."""
    from lane_ray.config import LaneConfig

    for flag, key in flags.items():
        section, name = key.split(".")
        f = LaneConfig.model_fields[section].annotation.model_fields[name]
        kind = f.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # int | None: the int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=None if choices else kind, choices=choices,
                       help=f"{f.description} ({key}, default {f.default})")


def _flag_values(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(args, flag.replace("-", "_")) for flag, key in flags.items()}


def _command(sub: Any, name: str, help: str, func: Any, common: bool = True, dataset: bool | None = None,
             flags: dict[str, str] | None = None, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand running ``func``: the common options unless ``common`` is false, the dataset as a positional
    (``dataset=True``) or ``--dataset`` (False), and one flag per config field of ``flags``."""
    p = sub.add_parser(name, help=help, **kw)
    if common:
        _common(p)
    if dataset is not None:
        _dataset_args(p, positional=dataset)
    _field_flags(p, flags or {})
    p.set_defaults(func=func)
    return p


def _group(sub: Any, name: str, help: str, dest: str) -> Any:
    """A command with its own required subcommands (``lane data ...``, ``lane experiment ...``)."""
    return sub.add_parser(name, help=help).add_subparsers(dest=dest, metavar="SUBCOMMAND", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lane", description="LANE-Ray: explainable sequential recommendation "
                                     "on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = _command(sub, "run", "run the whole pipeline (default: ml-100k with the CPU models)", cmd_run, dataset=False)
    p.add_argument("--force", action="store_true", help="recompute stages even when their output is current")

    dsub = _group(sub, "data", "dataset commands: stats, prepare, synth", "data_command")
    p = _command(dsub, "stats", "statistics of a dataset after preprocessing", cmd_data_stats, dataset=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _command(dsub, "prepare", "write the canonical tables into OUT/data/", cmd_data_prepare, dataset=True)
    _command(dsub, "synth", "generate a synthetic dataset into OUT/data/", cmd_data_synth, flags=SYNTH_FLAGS)

    p = _command(sub, "embed", "embed catalogue titles with Ray Data (incremental, resumable)", cmd_embed)
    p.add_argument("--catalog", metavar="PATH", help="catalogue Parquet (default: OUT/data/catalog.parquet)")
    _command(sub, "preferences", "LLM preferences for every user's train prefix (Ray Data, cached)", cmd_preferences,
             dataset=False, flags=PREFERENCE_FLAGS)
    p = _command(sub, "explain", "explanations that state the recommender's attribution, with checks that they "
                 "follow it (Ray Data, cached)", cmd_explain, flags=EXPLAIN_FLAGS)
    p.add_argument("--candidates", metavar="FILE", required=True,
                   help="candidates.parquet with user_id, item_id, rank, score and the attribution columns "
                   "pref_contrib, pref_share, history_item_ids, history_contrib (optional hit_rate), as `lane "
                   "evaluate` writes it; preferences come from OUT/preferences.parquet, titles from OUT/data/")
    _command(sub, "train", "train one recommender variant with Ray Train (DDP), then evaluate it on test", cmd_train,
             dataset=False, flags=TRAIN_FLAGS | MODEL_FLAGS)
    p = _command(sub, "evaluate", "evaluate trained checkpoints on test (full ranking and sampled-100)", cmd_evaluate)
    p.add_argument("--checkpoint", metavar="DIR", action="append",
                   help="checkpoint directory (repeatable; default: every one under OUT/checkpoints/)")
    p.add_argument("--faithfulness", action="store_true",
                   help="also measure whether removing the top-weight preference hurts more than a random one")

    esub = _group(sub, "experiment", "experiments: ablation", "experiment")
    p = _command(esub, "ablation", "id / title / lane / lane-shuffled for each backbone over seeds",
                 cmd_experiment_ablation, dataset=False, flags=TRAIN_FLAGS)
    p.add_argument("--backbones", default="sasrec", help="comma-separated: sasrec,gru4rec,bert4rec,diffurec")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants (default all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    p.add_argument("--workers", type=int, default=0, help="0: train in this process (the same training loop, "
                   "without Ray Train); N: Ray Train with N workers")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness measurement")

    p = _command(sub, "serve", "start the Ray Serve app (ranking + explanations) on a run directory", cmd_serve,
                 flags=SERVE_FLAGS)
    p.add_argument("--run", metavar="DIR", default="runs/default",
                   help="run directory with data, embeddings, preferences and checkpoints (default runs/default)")

    p = _command(sub, "submit", "run a lane command as a job on a Ray cluster (ray job submit)", cmd_submit,
                 common=False, description="lane submit --address http://HEAD:8265 -- run --out s3://bucket/runs/x")
    for flag, kw in SUBMIT_OPTIONS:
        p.add_argument(flag, **kw)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the lane command and its arguments")

    p = _command(sub, "report", "markdown report with PNG plots of a run directory's artifacts", cmd_report,
                 common=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/report)")
    p = _command(sub, "status", "progress of a `lane run` (stages, their progress, ETA) from RUN/progress.json",
                 cmd_status, common=False)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--json", action="store_true", help="print the progress document as one JSON line")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until the run ends")

    p = _command(sub, "index", "build the serving app's ANN index (faiss) of a checkpoint's item table", cmd_index)
    p.add_argument("--run", metavar="DIR", default="runs/default", help="run directory (default runs/default)")
    p.add_argument("--checkpoint", default="lane",
                   help="a name under RUN/checkpoints or a path (default lane, what `lane run` trains)")
    p.add_argument("--kind", choices=["hnsw", "ivf"], default="hnsw", help="index type (default hnsw)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW build breadth (default 80)")
    p.add_argument("--nlist", type=int, help="IVF lists (default 4 * sqrt(items))")
    p.add_argument("--index-out", metavar="DIR", help="where to write (default RUN/index/<checkpoint>)")
    return parser


def _config(args: argparse.Namespace, **flags: Any):
    from lane_ray.config import load_config

    flags.update({key: getattr(args, flag, None) for flag, key in DATA_FLAGS.items()})
    values = {k: v for k, v in flags.items() if v is not None}
    if getattr(args, "out", None) is not None and not args.out.endswith(".parquet"):
        values["run.out"] = args.out
    cfg = load_config(args.config, args.overrides, values)
    from lane_ray.storage import open_run

    # an absolute local folder; s3:// / gs://: a local staging folder kept in sync with it
    cfg.run.out = open_run(cfg.run.out, cfg.run.stage_dir)
    return cfg


def cmd_data_stats(args: argparse.Namespace) -> int:
    stats = stages.dataset_stats(_config(args), args.quiet or args.json)
    print(json.dumps(stats) if args.json else "\n".join(f"{k:>14}: {v}" for k, v in stats.items()))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    if args.out is None:
        raise LaneError("lane data prepare: --out DIR is required")
    return _counts(args.out, stages.prepare_data(_config(args), args.quiet, force=True)["stats"])


def cmd_data_synth(args: argparse.Namespace) -> int:
    if args.out is None:
        raise LaneError("lane data synth: --out DIR is required")
    return _counts(args.out, stages.synthesize(_config(args, **_flag_values(args, SYNTH_FLAGS)), args.quiet))


def _counts(out: str, s: dict[str, Any]) -> int:
    print(f"{Path(out) / 'data'}: {s['users']} users, {s['items']} items, {s['interactions']} interactions")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    cfg = _config(args)
    catalog, dest = stages.embedding_paths(args.out, args.catalog, cfg.run.out)
    m = stages.embed_catalog(cfg, catalog, dest, args.quiet, dest.parent)
    print(f"{dest}: {m['rows']} embeddings (dim {m['dim']}): {m['embedded_now']} new, {m['reused']} reused, "
          f"{m['rejected']} rejected")
    return 0


def cmd_preferences(args: argparse.Namespace) -> int:
    cfg = _config(args, **_flag_values(args, PREFERENCE_FLAGS))
    stages.prepare_data(cfg, args.quiet)
    m = stages.extract_preferences(cfg, args.quiet)
    status = ", ".join(f"{k} {v}" for k, v in sorted(m["status"].items()))
    print(f"{Path(cfg.run.out) / 'preferences.parquet'}: {m['users']} users ({m['extracted_now']} extracted now, "
          f"{m['cached']} cached); status: {status}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from lane_ray.llm.explain_checks import format_check_rates

    cfg = _config(args, **_flag_values(args, EXPLAIN_FLAGS))  # pydantic validates them all
    m = stages.explain_candidates(cfg, Path(args.candidates), args.quiet)
    print(f"{Path(cfg.run.out) / 'explanations.parquet'}: {m['rows']} explanations ({m['explained_now']} generated "
          f"now, {m['cached']} cached); source {m['source']}; format_ok {m['format_ok']}/{m['rows']}; checks: "
          f"{format_check_rates(m)}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """`lane submit`: submit the lane command after `--` (lane_ray.submit), then follow it to its end."""
    from lane_ray.submit import NOT_JOBS, entrypoint_resources, load_runtime_env, submit, wait

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command and command[0] not in NOT_JOBS:
        build_parser().parse_args(command)  # refuse a bad command here, not on the cluster
    env = load_runtime_env(args.runtime_env) if args.runtime_env else None
    job_id = submit(command, args.address, args.working_dir, args.job_id, env, args.entrypoint_num_cpus,
                    args.entrypoint_num_gpus, args.entrypoint_memory, entrypoint_resources(args.entrypoint_resources))
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

    out, meta = build_for_run(args.run, args.checkpoint, args.kind, args.index_out, quiet=args.quiet,
                              hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, nlist=args.nlist)
    print(f"{out}: {meta['kind']} index of {meta['items']} items x {meta['dim']} in {meta['build_seconds']} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    flags = _flag_values(args, SERVE_FLAGS)
    cfg = _config(args, **flags)  # validates everything before Ray starts
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    app = importlib.import_module("serve.app")  # the Ray Serve app package, beside the library
    return app.serve_forever(cfg, args.run, {"run_dir": args.run, "config": args.config, "set": overrides},
                             on_ready=lambda url: print(url, flush=True))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args, **_flag_values(args, TRAIN_FLAGS | MODEL_FLAGS))
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
    cfg = _config(args, **_flag_values(args, TRAIN_FLAGS))
    names = [[x.strip() for x in arg.split(",") if x.strip()] for arg in (args.backbones, args.variants)]
    stages.ablation(cfg, *names, args.seeds, args.workers, not args.no_faithfulness, args.quiet)
    out = Path(cfg.run.out)
    print(f"{out / 'metrics.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline on one run directory (:func:`lane_ray.pipeline.stages.run_pipeline`)."""
    r = stages.run_pipeline(_config(args), args.quiet, force=args.force)
    print(r["run_dir"], r["report"], sep="\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print a run directory's progress view (RUN/progress.json), once or every --watch seconds."""
    from lane_ray.progress import format_progress, watch_progress

    for doc in watch_progress(args.run_dir, args.watch):
        print(json.dumps(doc) if args.json else format_progress(doc), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lane_ray.storage import close_all

    args = build_parser().parse_args(argv)

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
