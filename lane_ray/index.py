"""Approximate top-k over huge catalogues: a faiss index (HNSW or IVF, inner product) over a checkpoint's item
table, so the Ranker scores a few thousand candidates instead of every item.

The item table is what the model scores with: the ID embeddings, or the title vectors through the trained
projection (title and lane variants). Built by ``lane index`` / ``jobs/build_index.py`` into
``RUN/index/<checkpoint>/`` (``index.faiss`` + ``index.json``); the Ranker uses it when ``serve.ann_index`` names
it. The index remembers the checkpoint's weights hash, so a retrained checkpoint never meets a stale index.
Needs the ``ann`` extra (``faiss-cpu``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from lane_ray.errors import ConfigError, DataError

KINDS = ("hnsw", "ivf")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("the ANN index needs faiss: pip install 'lane-ray[ann]' (faiss-cpu)") from None
    return faiss


def checkpoint_digest(ckpt: Path) -> str:
    """SHA-1 of the checkpoint's weights file (what the item table is computed from)."""
    h = hashlib.sha1()
    with open(ckpt / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def item_table(ckpt: Path) -> np.ndarray:
    """``[N, H]`` float32 item vectors of a checkpoint (dense indices 1..N; the padding row dropped)."""
    import torch

    from lane_ray.models.recommender import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        return np.ascontiguousarray(model.items.table()[1:].float().numpy())


def build_index(vectors: np.ndarray, kind: str = "hnsw", hnsw_m: int = 32, ef_construction: int = 80,
                nlist: int | None = None, threads: int | None = None) -> Any:
    """An inner-product faiss index over ``vectors`` (row r = dense index r + 1)."""
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    n, d = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)]
        index.train(sample)
    else:
        raise ConfigError(f"index kind '{kind}': choose from {', '.join(KINDS)}")
    index.add(vectors)
    return index


def write_index(out: Path, index: Any, meta: dict[str, Any]) -> Path:
    """``out/index.faiss`` and ``out/index.json``, each written to a temporary name and renamed."""
    from lane_ray.atomic import atomic_path
    from lane_ray.io import write_json

    faiss = _faiss()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    write_json(out / "index.json", meta)
    return out


def build_for_checkpoint(ckpt: Path, out: Path, kind: str = "hnsw", **params: Any) -> dict[str, Any]:
    """Build and write the index of one checkpoint; returns its description (also ``index.json``)."""
    t0 = time.perf_counter()
    vectors = item_table(ckpt)
    index = build_index(vectors, kind, **params)
    used = ({"hnsw_m": index.hnsw.nb_neighbors(1), "ef_construction": index.hnsw.efConstruction}
            if kind == "hnsw" else {"nlist": int(index.nlist)})
    meta = {"kind": kind, "params": used, "metric": "inner_product",
            "items": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "checkpoint": str(ckpt.resolve()),
            "checkpoint_sha1": checkpoint_digest(ckpt), "build_seconds": round(time.perf_counter() - t0, 2)}
    write_index(out, index, meta)
    return meta


class AnnIndex:
    """A loaded index, checked against the checkpoint it serves."""

    def __init__(self, path: Path, ckpt: Path, ef_search: int = 128, nprobe: int = 32) -> None:
        meta_path = path / "index.json"
        if not meta_path.exists() or not (path / "index.faiss").exists():
            raise DataError("no ANN index here (build it with `lane index`)", file=path)
        meta = json.loads(meta_path.read_text())
        if meta.get("checkpoint_sha1") != checkpoint_digest(ckpt):
            raise DataError(f"the ANN index was built for other weights than {ckpt}: rebuild it with `lane index`",
                            file=meta_path)
        faiss = _faiss()
        self.index = faiss.read_index(str(path / "index.faiss"))
        self.meta = meta
        if meta["kind"] == "hnsw":
            self.index.hnsw.efSearch = ef_search
        else:
            self.index.nprobe = nprobe

    def search(self, reps: np.ndarray, k: int) -> np.ndarray:
        """``[B, k]`` dense item indices (1-based; 0 where fewer than ``k`` were found), best first."""
        _, ids = self.index.search(np.ascontiguousarray(reps, dtype=np.float32), k)
        return np.where(ids >= 0, ids + 1, 0)


def build_for_run(run_dir: str | Path, checkpoint: str = "lane", kind: str = "hnsw", out: str | Path | None = None,
                  quiet: bool = False, **params: Any) -> tuple[Path, dict[str, Any]]:
    """`lane index`: the index of a run's checkpoint (a name under ``RUN/checkpoints`` or a path), written to
    ``out`` (default ``RUN/index/<checkpoint>``), where the serving app finds it; ``(out, description)``."""
    from lane_ray.console import log
    from lane_ray.models.checkpoints import resolve_checkpoint

    ckpt = resolve_checkpoint(Path(run_dir), checkpoint)
    dest = Path(out) if out else Path(run_dir) / "index" / ckpt.name
    if not quiet:
        log(f"index: building a {kind} index of {ckpt.name}'s item table")
    return dest, build_for_checkpoint(ckpt, dest, kind, **params)

