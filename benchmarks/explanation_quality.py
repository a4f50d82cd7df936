"""Do the explanations follow the model? Runs the explanation stage (with the follows_attribution regeneration)
for the first N users' top K candidates of a run directory and prints every check rate, its chance level, the
counts and the seconds per explanation as one JSON object (the keys of ``explanation_checks.json``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/explanation_quality.py --run runs/default --users 100 --top-k 3 \\
        --json --out-json benchmarks/results/explanation_quality.json

The run needs ``data/``, ``preferences.parquet`` and a ``candidates.parquet`` with the attribution columns
(``lane evaluate``). Outputs go to ``RUN/bench_explanations/`` so the run's own explanations are untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _results import emit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="run directory")
    ap.add_argument("--users", type=int, default=100, help="first N users of the candidates by id")
    ap.add_argument("--top-k", type=int, default=3, help="explain ranks 1..K")
    ap.add_argument("--mode", choices=["grounded", "judge"], default="grounded")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process LLM")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON (else a short table)")
    ap.add_argument("--out-json", type=Path, help="also write the summary here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set explain.avoid_unused=false (repeatable)")
    ap.add_argument("--dest", default="bench_explanations",
                    help="folder under RUN for the explanations (default bench_explanations)")
    args = ap.parse_args(argv)

    from lane_ray.config import load_config
    from lane_ray.llm import backend_kwargs, make_backend, model_identity
    from lane_ray.llm.explain import settings_from_config
    from lane_ray.pipeline.explain import load_requests, run_explanations
    from lane_ray.text import TextEncoder

    cfg = load_config(overrides=args.overrides, values={"explain.mode": args.mode})
    settings = settings_from_config(cfg)
    reqs, controls, vocab = load_requests(args.run, args.run / "candidates.parquet", args.top_k, args.users,
                                          controls=args.mode == "judge")
    kwargs = backend_kwargs(cfg.llm)
    if cfg.llm.backend == "transformers":
        kwargs["num_threads"] = args.threads
    backend = make_backend(cfg.llm.backend, **kwargs)
    dest = args.run / args.dest
    dest.mkdir(parents=True, exist_ok=True)
    summary = run_explanations(reqs, dest / "explanations.parquet", dest / "explanation_checks.json",
                               cfg.llm.backend, {}, settings, model_identity(cfg.llm), args.batch_size,
                               use_ray=False, backend=backend, encoder=TextEncoder(cfg.embed.model, device="cpu"),
                               vocab=vocab, controls=controls)
    summary.update(run=str(args.run), users_requested=args.users, top_k=args.top_k, overrides=args.overrides)
    emit(summary, out_json=args.out_json, show=args.json)
    if not args.json:
        for k, v in summary["rates"].items():
            print(f"{k:22s} {v!s:>8}  chance {summary['chance'].get(k)!s:>8}  "
                  f"{summary['passed'].get(k)} / {summary['measured'].get(k)}")
        print(f"seconds per explanation: {summary.get('seconds_per_explanation')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
