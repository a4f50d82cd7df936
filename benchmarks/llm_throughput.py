"""Preference-extraction throughput of the configured LLM backend, and its failure/repair/fallback rates.

    python benchmarks/llm_throughput.py --json                                  # SmolLM2 on CPU, ml-100k
    python benchmarks/llm_throughput.py --users 64 --batch-sizes 1,8,32 --json
    python benchmarks/llm_throughput.py --set llm.backend=vllm --set llm.model=/models/x --batch-sizes 128,1024
    python benchmarks/llm_throughput.py --rates-from runs/default/preferences.parquet --json

The backend is built once (load time reported apart) in this process, from the same configuration as
``lane preferences`` (``--config``/``--set``). The first ``--users`` users of the dataset (train prefixes, as
the stage builds them) are extracted once per batch size with the production code path (``extract_batch``:
constrained decoding, slot checks, retries, fallback); each batch size reports wall seconds, generated
tokens, tokens/s, users/s, generation calls and the status counts. ``--rates-from`` adds the status rates
and title-copy rate of an existing ``preferences.parquet`` (e.g. all 943 ml-100k users from ``lane run``).
Prints one JSON line (and writes it with ``--out-json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any


class CountingBackend:
    """Wraps a backend to count generation calls and the conversations they carried."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls = 0
        self.conversations = 0

    def generate(self, conversations, params, prefill="", constraint=None):  # noqa: ANN001 - protocol
        self.calls += 1
        self.conversations += len(conversations)
        return self.inner.generate(conversations, params, prefill=prefill, constraint=constraint)


def status_rates(preferences: list[list[str]], statuses: list[str], titles: list[list[str]] | None) -> dict:
    """Status counts and rates, and the fraction of preferences that copy one of the user's history titles."""
    from lane_ray.llm.quality import copies_title_rate

    n = len(statuses)
    counts = Counter(statuses)
    out: dict[str, Any] = {"users": n, "status": dict(counts),
                           **{f"{k}_rate": round(counts.get(k, 0) / n, 4) if n else None
                              for k in ("ok", "repaired", "fallback")}}
    if titles is not None:
        rate = copies_title_rate(preferences, titles)
        out["copies_title_rate"] = round(rate, 4) if rate is not None else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k", help="dataset name or path (as `lane preferences`)")
    ap.add_argument("--users", type=int, default=32, help="users extracted per batch size (the first N by id)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated users per generation call")
    ap.add_argument("--config", help="YAML configuration (llm and preferences sections apply)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rates-from", type=Path, help="also report status rates of this preferences.parquet")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--out-json", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lane_ray.config import load_config
    from lane_ray.data import load_dataset
    from lane_ray.llm import backend_kwargs, make_backend
    from lane_ray.llm.preferences import extract_batch
    from lane_ray.pipeline.preferences import settings_from_config, user_histories

    cfg = load_config(args.config, args.overrides, {"data.dataset": args.dataset})
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    if not sizes or min(sizes) < 1 or args.users < 1:
        raise SystemExit("error: --users and every --batch-sizes value must be >= 1")
    prepared = load_dataset(cfg.data)
    users = user_histories(prepared.interactions, prepared.catalog, args.users)
    settings = settings_from_config(cfg.preferences, prepared.catalog)
    t0 = time.perf_counter()
    backend = make_backend(cfg.llm.backend, **backend_kwargs(cfg.llm))
    load_s = time.perf_counter() - t0
    counter = getattr(backend, "count_tokens", None)
    result: dict[str, Any] = {"backend": cfg.llm.backend, "model": backend.model_id, "users": len(users),
                              "prompt_version": settings.prompt_version, "load_seconds": round(load_s, 2),
                              "threads": cfg.llm.threads_per_actor or os.cpu_count(), "batch": {}}
    titles = [[it.title for it in u.items] for u in users]
    for bs in sizes:
        wrapped = CountingBackend(backend)
        t1 = time.perf_counter()
        results = []
        for start in range(0, len(users), bs):
            results += extract_batch(users[start:start + bs], wrapped, settings, counter)
        dt = time.perf_counter() - t1
        tokens = sum(r.new_tokens for r in results)
        result["batch"][str(bs)] = {
            "seconds": round(dt, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / dt, 1),
            "users_per_s": round(len(results) / dt, 3), "calls": wrapped.calls,
            **status_rates([r.preferences for r in results], [r.status for r in results], titles),
        }
        if not args.json:
            print(f"batch {bs}: {result['batch'][str(bs)]}", file=sys.stderr)
    if args.rates_from:
        from lane_ray.io import read_parquet

        t = read_parquet(args.rates_from, columns=["user_id", "preferences", "status"])
        all_users = {u.user_id: u for u in user_histories(prepared.interactions, prepared.catalog)}
        ids = t["user_id"].to_pylist()
        known = [i in all_users for i in ids]
        hist = [[it.title for it in all_users[i].items] for i in ids] if all(known) else None
        result["rates_from"] = {"path": str(args.rates_from),
                                **status_rates(t["preferences"].to_pylist(), t["status"].to_pylist(), hist)}
    line = json.dumps(result)
    print(line)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out_json.parent, delete=False) as fh:
            fh.write(line + "\n")
        os.replace(fh.name, args.out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
