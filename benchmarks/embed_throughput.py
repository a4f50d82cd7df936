"""Title-embedding throughput: direct ``SentenceTransformer.encode`` vs the Ray Data stage, same machine.

    python benchmarks/embed_throughput.py --items 200000 --json

Both sides embed the same N synthetic titles (``lane_ray.data.synth``) with the same encoder batch size and
the same number of torch threads (``--threads``, default: all cores), each in a fresh child process:

- direct: one process, model loaded first (not timed), then one ``encode`` call over all titles; run
  before and after the Ray side (the shared machine's speed drifts) and averaged;
- ray: a local Ray cluster (``ray.init`` not timed), then ``embed_texts`` from the dataset's creation to
  the last row written (``embed_seconds``: actor start and model load included). On CPU its ``--threads`` are
  split into actors of ``--threads-per-actor`` threads (default 1, the stage's own default layout).

RSS is sampled every 250 ms for the direct process, the Ray driver and each Ray worker process (actors).
Prints one JSON line: ``items, direct_titles_per_s, ray_titles_per_s, ratio, peak_rss_mb`` (the largest
single process of the Ray run) plus ``driver_peak_rss_mb``, ``actor_peak_rss_mb``, ``direct_peak_rss_mb``,
seconds and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _results import emit

DIRECT = r"""
import json, sys, time, os
os.environ["HF_HUB_OFFLINE"] = "1"
import pyarrow.parquet as pq
from lane_ray.text import TextEncoder
path, threads, batch, device, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
titles = pq.read_table(path, columns=["title"])["title"].to_pylist()
enc = TextEncoder(model, device=device, batch_size=batch, num_threads=threads)
enc.encode(titles[:64])  # warm-up
t0 = time.perf_counter()
vecs = enc.encode(titles)
if device.startswith("cuda"):
    import torch
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rows": int(vecs.shape[0])}))
"""

RAY = r"""
import json, sys, os
os.environ["HF_HUB_OFFLINE"] = "1"
import ray
from lane_ray.config import EmbedConfig, RayConfig
from lane_ray.pipeline.embed import embed_texts
path, out, tmp = sys.argv[1], sys.argv[2], sys.argv[6]
threads, batch, cpus = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
nice = None if sys.argv[7] == "default" else int(sys.argv[7])
device, model, rows_per_batch = sys.argv[8], sys.argv[9], int(sys.argv[10])
tokenize = {"auto": None, "on": True, "off": False}[sys.argv[11]]
per_actor = int(sys.argv[12])
from lane_ray.pipeline.cluster import init_ray
init_ray(RayConfig(num_cpus=cpus, object_store_memory_mb=512, temp_dir=tmp))  # not timed
cfg = EmbedConfig(model=model, batch_size=batch, rows_per_batch=rows_per_batch, device=device,
                  tokenize_stage=tokenize)
if device == "cpu":  # the same torch threads as direct, split into actors of per_actor threads
    cfg = cfg.model_copy(update={"threads_per_actor": per_actor, "max_actors": max(1, threads // per_actor)})
if nice is not None:
    cfg = cfg.model_copy(update={"actor_niceness": nice})
m = embed_texts(path, out, cfg, RayConfig())
print(json.dumps({"seconds": m["embed_seconds"], "stage_seconds": m["seconds"], "rows": m["rows"],
                  "tokenizer_actors_max": m["ray"].get("tokenizer_actors_max", 0),
                  "actors_max": m["ray"].get("actors_max"), "cpus_per_actor": m["ray"].get("cpus_per_actor")}))
"""


def _mem(p: psutil.Process) -> tuple[int, int]:
    """(RSS, private) bytes: private = RSS minus file-backed and shared-memory pages (Linux: RssAnon), i.e. what
    the process itself allocated, without the object store's shared pages and the mapped libraries."""
    mi = p.memory_info()
    return mi.rss, mi.rss - getattr(mi, "shared", 0)


def _run_sampled(cmd: list[str], env: dict[str, str],
                 trace: list[dict] | None = None) -> tuple[dict, dict[str, float]]:
    """Run ``cmd``; sample the memory of it and its descendants; return (its JSON output, peaks by role in MB).

    Peaks are ``<role>`` (RSS) and ``<role>_private`` for the roles driver, actor (``ray::`` workers) and
    other (GCS, raylet, ...). ``trace`` gets one row of per-role figures every 5 s."""
    # stderr goes to a file: Ray logs progress there, and an undrained pipe would block the child.
    log, result = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=result, stderr=log, text=True, env=env)
    root = psutil.Process(proc.pid)
    roles = ("driver", "actor", "other")
    peaks = {k: 0 for r in roles for k in (r, f"{r}_private")}
    next_trace = 0.0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        now = {k: 0 for k in peaks}
        for p in procs:
            try:
                rss, private = _mem(p)
                name = " ".join(p.cmdline()[:1])
            except psutil.Error:
                continue
            role = "driver" if p.pid == root.pid else ("actor" if name.startswith("ray::") else "other")
            now[role] = max(now[role], rss)
            now[f"{role}_private"] = max(now[f"{role}_private"], private)
        for k, v in now.items():
            peaks[k] = max(peaks[k], v)
        elapsed = time.perf_counter() - t0
        if trace is not None and elapsed >= next_trace:
            trace.append({"s": round(elapsed, 1), **{k: round(v / 2**20, 1) for k, v in now.items()}})
            next_trace = elapsed + 5.0
        time.sleep(0.25)
    proc.wait()
    log.seek(0)
    result.seek(0)
    err, out = log.read(), result.read()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), {k: round(v / 2**20, 1) for k, v in peaks.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads: direct runs one process with all of them; the Ray stage splits them into "
                    "threads / --threads-per-actor encoder actors")
    ap.add_argument("--threads-per-actor", type=int, default=1,
                    help="torch threads per Ray encoder actor (embed.threads_per_actor; default 1, as the stage)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: both sides on the GPU (fp16); the Ray stage then runs one actor per GPU")
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="packaged encoder name or local directory")
    ap.add_argument("--rows-per-batch", type=int, default=4096, help="embed.rows_per_batch of the Ray stage")
    ap.add_argument("--tokenize-stage", choices=["auto", "on", "off"], default="auto",
                    help="embed.tokenize_stage of the Ray stage: CPU tokenizer actors ahead of the encoder "
                    "(auto = on with GPUs)")
    ap.add_argument("--skip-direct", action="store_true", help="only the Ray stage (memory runs)")
    ap.add_argument("--actor-niceness", type=int, default=None,
                    help="override embed.actor_niceness (e.g. 10 for a memory run beside other work)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--out-json", type=Path, help="also write the JSON result here")
    ap.add_argument("--memory-trace", type=Path,
                    help="write the Ray run's per-role memory every 5 s here (JSON lines)")
    args = ap.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        from lane_ray.config import SynthConfig
        from lane_ray.data.synth import generate

        generate(SynthConfig(items=args.items, users=1), tmp)
        titles = str(Path(tmp) / "data" / "catalog.parquet")
        result: dict = {"items": args.items, "batch_size": args.batch_size, "threads": args.threads,
                        "device": args.device, "rows_per_batch": args.rows_per_batch}
        if args.device == "cuda":
            import torch

            result["gpu"] = torch.cuda.get_device_name(0)
        direct_cmd = [sys.executable, "-c", DIRECT, titles, str(args.threads), str(args.batch_size), args.device,
                      args.model]
        direct_runs = []
        if not args.skip_direct:
            d, dpeak = _run_sampled(direct_cmd, env)
            direct_runs.append(d["rows"] / d["seconds"])
            result["direct_peak_rss_mb"] = dpeak["driver"]
        trace: list[dict] = []
        r, rpeak = _run_sampled([sys.executable, "-c", RAY, titles, str(Path(tmp) / "emb.parquet"), str(args.threads),
                                 str(args.batch_size), str(os.cpu_count() or 1), str(Path(tmp) / "ray"),
                                 "default" if args.actor_niceness is None else str(args.actor_niceness),
                                 args.device, args.model, str(args.rows_per_batch), args.tokenize_stage,
                                 str(args.threads_per_actor)], env, trace)
        if args.memory_trace:
            args.memory_trace.write_text("".join(json.dumps(row) + "\n" for row in trace))
        result["ray_titles_per_s"] = round(r["rows"] / r["seconds"], 1)
        result["ray_seconds"] = round(r["seconds"], 2)
        result["ray_stage_seconds"] = round(r["stage_seconds"], 2)
        result["tokenizer_actors_max"] = r["tokenizer_actors_max"]
        result["ray_actors"], result["ray_threads_per_actor"] = r["actors_max"], args.threads_per_actor
        result["ray_cpus_per_actor"] = r["cpus_per_actor"]
        if not args.skip_direct:
            # direct again after Ray: the machine is shared and its speed drifts; average both runs
            d, _ = _run_sampled(direct_cmd, env)
            direct_runs.append(d["rows"] / d["seconds"])
            result["direct_runs_titles_per_s"] = [round(x, 1) for x in direct_runs]
            result["direct_titles_per_s"] = round(sum(direct_runs) / len(direct_runs), 1)
        if "direct_titles_per_s" in result:
            result["ratio"] = round(result["ray_titles_per_s"] / result["direct_titles_per_s"], 3)
        result["driver_peak_rss_mb"] = rpeak["driver"]
        result["actor_peak_rss_mb"] = rpeak["actor"]
        # private = RSS less shared pages: the object store's pages a process touched count in its RSS
        result["driver_peak_private_mb"] = rpeak["driver_private"]
        result["actor_peak_private_mb"] = rpeak["actor_private"]
        result["peak_rss_mb"] = max(rpeak["driver"], rpeak["actor"])
    return emit(result, out_json=args.out_json)


if __name__ == "__main__":
    sys.exit(main())
