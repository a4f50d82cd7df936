"""Throughput of the LLM stages (preferences, explanations) and where their time goes, optionally beside another
commit's code in the same invocation, so that a speed-up is a ratio measured on one machine at one time.

    python benchmarks/llm_throughput.py --json                                    # preferences, 32 ml-100k users
    python benchmarks/llm_throughput.py --users 64 --baseline 35aa59e --repeats 2 --json
    python benchmarks/llm_throughput.py --stage explanations --users 32 --baseline HEAD~3 --json
    python benchmarks/llm_throughput.py --via-cli --users 64 --baseline 35aa59e --json   # the whole stage on Ray
    python benchmarks/llm_throughput.py --set llm.backend=openai --set llm.base_url=http://127.0.0.1:8000/v1
    python benchmarks/llm_throughput.py --rates-from runs/default/preferences.parquet --json

Each measurement runs in a fresh subprocess whose ``PYTHONPATH`` points at the code under test: this checkout
("current") or, with ``--baseline REF``, a ``git worktree`` of REF made in a temporary folder ("baseline").
The two alternate ``--repeats`` times (baseline first), so drift of a shared machine hits both; the JSON gives
every run and the ratio of the medians.

- ``--stage preferences`` (default): the first ``--users`` users of the dataset (train prefixes, as the stage
  builds them) through the production call, ``extract_batch`` (constrained decoding, slot checks, retries,
  fallback), ``--batch-size`` users per call (the stage's default, 32), in-process: users/s, new tokens and
  the status counts.
- ``--stage explanations``: one explanation request per user for the same users, built the same way by every
  code version: preferences from the history (the attribute fallback, deterministic), a target the user never
  chose, and a seeded random attribution (``pref_contrib``, evidence items, hit rate). The engine's work per
  explanation is that of the real stage (prompt, per-row template, retries); only the numbers are made up.
  Through ``explain_batch``, ``--batch-size`` rows per call (the stage's default, 16): explanations/s.
- ``--via-cli``: ``lane preferences --max-users N`` in a fresh run directory (Ray Data actors, Parquet parts,
  the cache), reporting the stage's own users/s from its manifest and the command's wall time.

The profile (in-process stages, transformers backend) splits the wall time into: forward passes over prompts
(calls with 16 or more tokens per row), forward passes while decoding, the constraint (the template
processor's calls), the rest of ``generate`` (tokenising, sampling, cache bookkeeping) and the time outside
``generate`` (prompt building, parsing, retries' bookkeeping). Model load is timed apart. Prints one JSON line
(and writes ``benchmarks/results/NAME.json`` with ``--save NAME``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _results import emit

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS_PER_ROW = 16  # a forward pass with at least this many tokens per row is a prompt pass


# ------------------------------------------------------------------------------------------------ worker side


class Profile:
    """Wall-clock split of the LLM work in this process (see the module docstring)."""

    def __init__(self) -> None:
        self.t: Counter[str] = Counter()
        self.n: Counter[str] = Counter()

    def attach(self, backend: Any) -> None:
        model = getattr(backend, "model", None)
        if model is not None:
            def pre(mod: Any, args: Any, kwargs: Any) -> None:
                mod._lane_t0 = time.perf_counter()

            def post(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                kind = "prompt_forward" if ids is not None and ids.shape[1] >= PROMPT_TOKENS_PER_ROW else \
                    "decode_forward"
                self.t[kind] += time.perf_counter() - mod._lane_t0
                self.n[kind] += 1
                if ids is not None:
                    self.n[kind + "_tokens"] += int(ids.numel())

            model.register_forward_pre_hook(pre, with_kwargs=True)
            model.register_forward_hook(post, with_kwargs=True)
        try:
            from lane_ray.llm import transformers_backend as tb
        except ImportError:
            return
        # the methods the constraint runs through: the logits-processor call (generate), or the decoding
        # loop's calls where the code has them
        names = [n for n in ("apply", "allowed", "advance") if hasattr(tb.TemplateProcessor, n)] or ["__call__"]
        for name in names:
            self._time_method(tb.TemplateProcessor, name, "constraint")
        self._time_method(type(backend), "generate", "generate")

    def _time_method(self, cls: Any, name: str, key: str) -> None:
        orig = getattr(cls, name)

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0

        setattr(cls, name, timed)

    def split(self, wall: float) -> dict[str, Any]:
        gen = self.t["generate"]
        known = self.t["prompt_forward"] + self.t["decode_forward"] + self.t["constraint"]
        return {"prompt_forward_s": round(self.t["prompt_forward"], 2),
                "decode_forward_s": round(self.t["decode_forward"], 2),
                "constraint_s": round(self.t["constraint"], 2),
                "generate_other_s": round(max(0.0, gen - known), 2),
                "outside_generate_s": round(max(0.0, wall - gen), 2),
                "prompt_forward_calls": self.n["prompt_forward"], "decode_forward_calls": self.n["decode_forward"],
                "prompt_forward_tokens": self.n["prompt_forward_tokens"],
                "decode_forward_tokens": self.n["decode_forward_tokens"]}


def _explain_requests(users: list[Any], catalog: Any, m: int, seed: int) -> list[Any]:
    """One synthetic explanation request per user (see the module docstring). Code versions from before the
    item-level attribution take per-user ``weights`` (the positive contributions) instead, and take their
    catalogue items from the users' histories."""
    import dataclasses
    import random

    from lane_ray.llm.explain import ExplainRequest
    from lane_ray.llm.preferences import fallback_preferences

    try:
        from lane_ray.pipeline.explain import catalogue_items

        items = catalogue_items(catalog)
    except ImportError:  # older code: no catalogue view; every distinct title the users have seen
        items = {}
        for u in users:
            for it in u.items:
                if all(x.title != it.title for x in items.values()):
                    items[len(items)] = it
    fields = {f.name for f in dataclasses.fields(ExplainRequest)}
    ids = sorted(items)
    rng = random.Random(seed)
    reqs = []
    for u in users:
        seen = {it.title for it in u.items}
        target = rng.choice([i for i in ids if items[i].title not in seen][:200])
        prefs = fallback_preferences(u.items, m, [])
        contrib = [rng.uniform(-0.2, 1.0) for _ in prefs]
        history_ids = [i for i in ids if items[i].title in seen][: len(u.items)]
        ev = rng.sample(history_ids, min(2, len(history_ids)))
        kwargs = dict(
            user_id=u.user_id, item_id=target, rank=rng.randint(1, 5), score=rng.uniform(2, 8),
            target=items[target], history=list(u.items), preferences=prefs, pref_contrib=contrib,
            pref_share=sum(c for c in contrib if c > 0), history_ids=history_ids, evidence_ids=ev,
            evidence_contrib=[rng.uniform(0.1, 1.0) for _ in ev], evidence=[items[i] for i in ev],
            hit_rate=rng.choice([None, 0.01, 0.03, 0.08]), weights=[max(0.0, c) for c in contrib])
        reqs.append(ExplainRequest(**{k: v for k, v in kwargs.items() if k in fields}))
    return reqs


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement with the ``lane_ray`` found on ``sys.path`` (the code under test)."""
    import lane_ray
    from lane_ray.config import load_config
    from lane_ray.data import load_dataset
    from lane_ray.llm import backend_kwargs, make_backend
    from lane_ray.pipeline.preferences import user_histories

    try:
        from lane_ray.llm.preferences import settings_from_config
    except ImportError:  # code versions that kept it with the stage
        from lane_ray.pipeline.preferences import settings_from_config

    cfg = load_config(spec.get("config"), spec["overrides"], {"data.dataset": spec["dataset"]})
    prepared = load_dataset(cfg.data)
    users = user_histories(prepared.interactions, prepared.catalog, spec["users"])
    t0 = time.perf_counter()
    backend = make_backend(cfg.llm.backend, **backend_kwargs(cfg.llm))
    load_s = time.perf_counter() - t0
    counter = getattr(backend, "count_tokens", None)
    prof = Profile()
    prof.attach(backend)
    bs = spec["batch_size"]
    out: dict[str, Any] = {"code": str(Path(lane_ray.__file__).resolve().parents[1]), "backend": cfg.llm.backend,
                           "model": backend.model_id, "load_seconds": round(load_s, 2),
                           "threads": _threads(), "batch_size": bs}
    if spec["stage"] == "preferences":
        from lane_ray.llm.preferences import extract_batch

        settings = settings_from_config(cfg.preferences, prepared.catalog)
        t1 = time.perf_counter()
        results = []
        for start in range(0, len(users), bs):
            results += extract_batch(users[start:start + bs], backend, settings, counter)
        wall = time.perf_counter() - t1
        out.update(prompt_version=settings.prompt_version, rows=len(results), seconds=round(wall, 2),
                   rows_per_s=round(len(results) / wall, 4), new_tokens=sum(r.new_tokens for r in results),
                   status=dict(Counter(r.status for r in results)),
                   preferences={str(r.user_id): r.preferences for r in results})
    else:
        from lane_ray.llm.explain import EXPLAIN_PROMPT_VERSION, explain_batch
        try:
            from lane_ray.llm.explain import settings_from_config as explain_settings
        except ImportError:  # code versions that kept it with the stage
            from lane_ray.pipeline.explain import settings_from_config as explain_settings

        settings = explain_settings(cfg)
        reqs = _explain_requests(users, prepared.catalog, cfg.preferences.m, spec["seed"])
        t1 = time.perf_counter()
        results = []
        for start in range(0, len(reqs), bs):
            results += explain_batch(reqs[start:start + bs], backend, settings, counter)
        wall = time.perf_counter() - t1
        out.update(prompt_version=EXPLAIN_PROMPT_VERSION, rows=len(results), seconds=round(wall, 2),
                   rows_per_s=round(len(results) / wall, 4), new_tokens=sum(e.new_tokens for e in results),
                   status=dict(Counter(e.source for e in results)))
    out["profile"] = prof.split(wall)
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ driver side


def _worktree(ref: str, base: Path) -> tuple[Path, str]:
    """A detached ``git worktree`` of ``ref`` under ``base``, and the commit it resolved to."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    path = base / f"code-{sha[:10]}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha], check=True,
                   capture_output=True, text=True)
    return path, sha


def _env(code: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a local cluster per run, started and stopped by the command itself
    return env


def _run_worker(code: Path, spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          env=_env(code), capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"error: the measurement with the code in {code} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _run_cli(code: Path, spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """``lane preferences --max-users N`` with ``code`` in a fresh run directory: the stage's manifest + wall."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    cmd = [sys.executable, "-m", "lane_ray.cli", "preferences", "--dataset", spec["dataset"], "--out", str(out),
           "--max-users", str(spec["users"]), "--set", "preferences.embed=false"]
    if spec.get("config"):
        cmd += ["--config", spec["config"]]
    for o in spec["overrides"]:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(code), capture_output=True, text=True, cwd=scratch)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"error: `lane preferences` with the code in {code} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    manifest = json.loads((out / "preferences.parquet" / "_manifest.json").read_text())
    keep = ("users", "status", "prompt_version", "extract_seconds", "new_tokens", "users_per_s", "tokens_per_s")
    return {"code": str(code), "command_seconds": round(wall, 2), "rows_per_s": manifest.get("users_per_s"),
            **{k: manifest[k] for k in keep if k in manifest}}


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


def _rates_from(path: Path, dataset: str, config: str | None, overrides: list[str]) -> dict[str, Any]:
    from lane_ray.config import load_config
    from lane_ray.data import load_dataset
    from lane_ray.io import read_parquet
    from lane_ray.pipeline.preferences import user_histories

    cfg = load_config(config, overrides, {"data.dataset": dataset})
    prepared = load_dataset(cfg.data)
    t = read_parquet(path, columns=["user_id", "preferences", "status"])
    all_users = {u.user_id: u for u in user_histories(prepared.interactions, prepared.catalog)}
    ids = t["user_id"].to_pylist()
    hist = [[it.title for it in all_users[i].items] for i in ids] if all(i in all_users for i in ids) else None
    return {"path": str(path), **status_rates(t["preferences"].to_pylist(), t["status"].to_pylist(), hist)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("preferences", "explanations"), default="preferences")
    ap.add_argument("--dataset", default="ml-100k", help="dataset name or path (as `lane preferences`)")
    ap.add_argument("--users", type=int, default=32, help="the first N users by id (one row each)")
    ap.add_argument("--batch-size", type=int, help="rows per generation call (default: the stage's, 32 / 16)")
    ap.add_argument("--baseline", metavar="REF", help="also measure this commit's code (git worktree), alternating")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per code version")
    ap.add_argument("--via-cli", action="store_true", help="measure `lane preferences` itself (Ray, Parquet parts)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic explanation requests")
    ap.add_argument("--config", help="YAML configuration (llm, preferences and explain sections apply)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rates-from", type=Path, help="also report status rates of this preferences.parquet")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--save", metavar="NAME", help="also write benchmarks/results/NAME.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.users < 1 or args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise SystemExit("error: --users, --repeats and --batch-size must be >= 1")
    if args.via_cli and args.stage != "preferences":
        raise SystemExit("error: --via-cli measures the preference stage only")
    spec = {"stage": args.stage, "dataset": args.dataset, "users": args.users, "config": args.config,
            "overrides": args.overrides, "seed": args.seed,
            "batch_size": args.batch_size or (32 if args.stage == "preferences" else 16)}
    result: dict[str, Any] = {"stage": args.stage, "users": args.users, "batch_size": spec["batch_size"],
                              "via_cli": args.via_cli, "repeats": args.repeats, "overrides": args.overrides,
                              "cpu_count": os.cpu_count()}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    result["current"] = {"commit": head.strip(), "uncommitted_changes": bool(dirty), "runs": []}
    with tempfile.TemporaryDirectory(prefix="lane-llm-bench-") as tmp:
        scratch = Path(tmp)
        versions: list[tuple[str, Path]] = []
        worktree = None
        try:
            if args.baseline:
                worktree, sha = _worktree(args.baseline, scratch)
                result["baseline"] = {"ref": args.baseline, "commit": sha, "runs": []}
                versions.append(("baseline", worktree))
            versions.append(("current", ROOT))
            for rep in range(args.repeats):
                for name, code in versions:
                    run = _run_cli(code, spec, scratch) if args.via_cli else _run_worker(code, spec)
                    run.pop("preferences", None)
                    result[name]["runs"].append(run)
                    if not args.json:
                        print(f"[{rep + 1}/{args.repeats}] {name}: {run.get('rows_per_s')} rows/s, "
                              f"status {run.get('status')}", file=sys.stderr)
        finally:
            if worktree is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                               capture_output=True)
    for name in ("baseline", "current"):
        if name in result:
            rates = [r["rows_per_s"] for r in result[name]["runs"] if r.get("rows_per_s")]
            result[name]["median_rows_per_s"] = round(statistics.median(rates), 4) if rates else None
    if "baseline" in result and result["baseline"]["median_rows_per_s"]:
        result["speedup"] = round(result["current"]["median_rows_per_s"] / result["baseline"]["median_rows_per_s"], 3)
    if args.rates_from:
        result["rates_from"] = _rates_from(args.rates_from, args.dataset, args.config, args.overrides)
    return emit(result, args.save or "", bool(args.save), args.json)


if __name__ == "__main__":
    sys.exit(main())
