"""Latency and throughput of the Ray Serve app over HTTP on loopback.

    python benchmarks/serve_latency.py --json                          # ml-100k run (runs/default), 1/8/32
    python benchmarks/serve_latency.py --synthetic-items 1000000 --json   # a 1M-item catalogue
    python benchmarks/serve_latency.py --explain-requests 6 --json     # also with explanations (CPU LLM)

The app runs in a local Ray cluster started here (``--cpus``), the load generator in this process: ``--concurrency``
threads, each with its own keep-alive HTTP connection, send ``POST /v1/recommend`` for random known users
(``k=10``) until ``--requests`` answers per level are in (after ``--warmup`` unmeasured ones). Reported per level:
p50/p95/p99/mean latency (ms), throughput (requests/s over the level's wall time) and the status counts.
With ``--explain-requests N`` the same is measured for ``explain: true`` at concurrency 1 (and 8 when N >= 8);
the explanation ``source`` counts (llm / template) are reported too.

``--synthetic-items N`` builds a throwaway run: N synthetic items, ``--synthetic-users`` users and an untrained
SASRec ``id`` checkpoint (hidden 64): the latency of exact scoring against N items does not depend on training.
The load generator shares the machine's cores with the server: on 2 cores that inflates the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _results import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_synthetic_run(run: Path, items: int, users: int, hidden: int = 64) -> Path:
    """A run directory with N synthetic items and an untrained SASRec ``id`` checkpoint."""
    import torch

    from lane_ray.config import SynthConfig, TrainConfig
    from lane_ray.data.synth import generate
    from lane_ray.models.recommender import save_checkpoint
    from lane_ray.pipeline.train import build_model
    from lane_ray.train.features import load_features

    generate(SynthConfig(items=items, users=users, mean_session_len=20, seed=0), run)
    torch.manual_seed(0)
    tc = TrainConfig(variant="id", hidden=hidden, layers=2, max_len=50)
    model = build_model(tc, load_features(run, titles=False, preferences=False))
    save_checkpoint(model.eval(), run / "checkpoints" / "sasrec-id-seed0", {"variant": "id"})
    return run


def ann_recall(run: Path, checkpoint: str, kind: str, users: np.ndarray, n: int, settings: list[int],
               target: float, k: int = 10) -> dict[str, Any]:
    """Build the index (timed), then for each search setting (HNSW efSearch or IVF nprobe) the recall@k of the ANN
    top-k against exact top-k over ``n`` users and the in-process scoring time per user (batches of one, as a
    lone request). ``chosen``: the cheapest setting reaching ``target`` recall (else the best one)."""
    from lane_ray.index import build_for_checkpoint
    from lane_ray.serving import RankerCore, RankQuery

    meta = build_for_checkpoint(run / "checkpoints" / checkpoint, run / "index" / checkpoint, kind,
                                threads=os.cpu_count())
    exact = RankerCore(run, checkpoint)
    approx = RankerCore(run, checkpoint, ann_index="auto")
    queries, truth, t_exact = [], [], 0.0
    for uid in users[:n]:
        u = exact.user(int(uid))
        q = [RankQuery(u.history, k, u.prefs)]
        t0 = time.perf_counter()
        truth.append(set(exact.score(q)[0]["items"]))
        t_exact += time.perf_counter() - t0
        queries.append(q)
    sweep = []
    for value in settings:
        if kind == "hnsw":
            approx.ann.index.hnsw.efSearch = value
        else:
            approx.ann.index.nprobe = value
        hits, t_ann = 0, 0.0
        for q, e in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            hits += len(e & set(approx.score(q)[0]["items"]))
            t_ann += time.perf_counter() - t0
        sweep.append({"setting": value, f"recall@{k}": round(hits / (n * k), 4),
                      "ann_ms_per_user": round(1000 * t_ann / n, 2)})
    good = [r for r in sweep if r[f"recall@{k}"] >= target]
    chosen = good[0] if good else max(sweep, key=lambda r: r[f"recall@{k}"])
    return {"kind": kind, "setting_name": "ef_search" if kind == "hnsw" else "nprobe", "items": meta["items"],
            "build_seconds": meta["build_seconds"], "params": meta["params"], "users": n,
            "exact_ms_per_user": round(1000 * t_exact / n, 2), "sweep": sweep, "target_recall": target,
            "chosen": chosen}


def _load(port: int, bodies: list[dict[str, Any]], concurrency: int, warmup: int) -> dict[str, Any]:
    """Send ``bodies`` (after ``warmup`` of them unmeasured) from ``concurrency`` threads; latency stats."""
    lat: list[float] = []
    status: Counter[int] = Counter()
    sources: Counter[str] = Counter()
    lock = threading.Lock()
    it = iter(enumerate(bodies))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                break
            n, body = nxt
            data = json.dumps(body)
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/recommend", data, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                code = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                code, payload = 599, b"{}"
            dt = time.perf_counter() - t0
            if n < warmup:
                continue
            with lock:
                lat.append(dt)
                status[code] += 1
                if code == 200:
                    for e in json.loads(payload).get("explanations", []):
                        sources[e["source"]] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    out = {"concurrency": concurrency, "requests": len(lat), "p50_ms": round(float(np.percentile(ms, 50)), 2),
           "p95_ms": round(float(np.percentile(ms, 95)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
           "mean_ms": round(float(ms.mean()), 2), "throughput_rps": round(len(lat) / wall, 1),
           "status": {str(k): v for k, v in sorted(status.items())}}
    if sources:
        out["explanation_sources"] = dict(sources)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/default"), help="run directory to serve")
    ap.add_argument("--checkpoint", default=None, help="serve.checkpoint (default: the config's)")
    ap.add_argument("--synthetic-items", type=int, help="serve a throwaway synthetic run with this many items")
    ap.add_argument("--synthetic-users", type=int, default=2000)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=400, help="measured requests per level")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured requests before each level")
    ap.add_argument("--explain-requests", type=int, default=0, help="also measure explain:true (0 = skip)")
    ap.add_argument("--ann", choices=["hnsw", "ivf"], help="also build this ANN index, measure its recall@10 "
                    "against exact scoring, and serve with it (serve.ann_index=auto)")
    ap.add_argument("--ann-users", type=int, default=300, help="users in the recall measurement")
    ap.add_argument("--ann-settings", default=None, help="comma-separated efSearch (hnsw) or nprobe (ivf) values "
                    "to sweep (default hnsw 64,128,256,512,1024,2048; ivf 8,32,128,512)")
    ap.add_argument("--ann-target-recall", type=float, default=0.95, help="serve with the cheapest setting reaching it")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for the app (serve.*, llm.*)")
    ap.add_argument("--no-throughput-optimized", action="store_true",
                    help="leave RAY_SERVE_THROUGHPUT_OPTIMIZED unset (Ray Serve's default mode)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--out-json", type=Path, help="also write the result here")
    ap.add_argument("--name", default=None, help="also save as benchmarks/results/<name>.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.no_throughput_optimized:  # what `lane serve` sets (serve.throughput_optimized)
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    import ray
    from ray import serve

    from lane_ray.io import read_parquet
    from serve.app import build_app, wait_healthy

    tmp = tempfile.TemporaryDirectory()
    result: dict[str, Any] = {"cpus": args.cpus,
                              "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"}
    overrides = list(args.overrides)
    run = args.run
    if args.synthetic_items:
        t0 = time.perf_counter()
        run = build_synthetic_run(Path(tmp.name) / "run", args.synthetic_items, args.synthetic_users)
        result["build_seconds"] = round(time.perf_counter() - t0, 1)
        overrides += ["serve.checkpoint=sasrec-id-seed0", "llm.backend=openai",
                      "llm.base_url=http://127.0.0.1:9/v1"]  # ranking only: no LLM is loaded
    if args.checkpoint:
        overrides.append(f"serve.checkpoint={args.checkpoint}")
    users = np.unique(read_parquet(run / "data" / "interactions.parquet", ["user_id"])["user_id"].to_numpy())
    if args.ann:
        import torch

        torch.set_num_threads(1)  # as in the Ranker replica (serve.ranker_threads)
        ckpt = args.checkpoint or ("sasrec-id-seed0" if args.synthetic_items else "lane")
        default = "64,128,256,512,1024,2048" if args.ann == "hnsw" else "8,32,128,512"
        settings = [int(x) for x in (args.ann_settings or default).split(",") if x]
        result["ann"] = ann_recall(run, ckpt, args.ann, np.random.default_rng(1).permutation(users),
                                   args.ann_users, settings, args.ann_target_recall)
        key = "serve.ann_ef_search" if args.ann == "hnsw" else "serve.ann_nprobe"
        overrides += ["serve.ann_index=auto", f"{key}={result['ann']['chosen']['setting']}"]
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=300 * 2**20, log_to_driver=False,
             configure_logging=False, _temp_dir=str(Path(tmp.name) / "ray"))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build_app({"run_dir": str(run), "set": overrides}), name="lane", route_prefix="/", blocking=False)
    health = wait_healthy(f"http://127.0.0.1:{port}")
    result.update(model=health["model"], items=health["items"], users=health["users"], llm=health["llm"],
                  startup_seconds=round(time.perf_counter() - t0, 1), overrides=overrides)
    rng = np.random.default_rng(0)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    result["ranking"] = []
    for c in levels:
        bodies = [{"user_id": int(u), "k": 10} for u in rng.choice(users, args.requests + args.warmup)]
        result["ranking"].append(_load(port, bodies, c, args.warmup))
    if args.explain_requests:
        result["explain"] = []
        for c in [1, 8] if args.explain_requests >= 8 else [1]:
            picks = rng.choice(users, args.explain_requests + 1)
            bodies = [{"user_id": int(u), "k": 10, "explain": True} for u in picks]
            result["explain"].append(_load(port, bodies, c, 1))
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()
    return emit(result, args.name, bool(args.name), args.json, args.out_json)


if __name__ == "__main__":
    sys.exit(main())
