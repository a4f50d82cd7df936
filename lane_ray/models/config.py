"""The one dataclass a recommender is built from (stored as ``config.json`` next to the weights)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lane_ray.config import BACKBONES  # the registry (lane_ray/config.py), re-exported by lane_ray.models


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`~lane_ray.models.SequentialRecommender`.

    ``num_items`` counts catalogue items; dense item indices run 1..num_items and 0 is padding.
    """

    num_items: int
    backbone: Literal["sasrec", "gru4rec", "bert4rec", "diffurec"] = "sasrec"
    item_mode: Literal["id", "title"] = "id"  # learned ID table, or title embeddings through a projection
    title_dim: int = 384  # width of the title (and preference) embeddings
    finetune_titles: bool = False  # title mode: train the title vectors themselves (else frozen buffer)
    sparse_items: bool = False  # id mode: the table gets sparse gradients (SparseAdam; bce with causal backbones)
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 200
    align: bool = False  # LANE: PreferenceAlignment over the user's preference embeddings
    pref_dim: int = 384
    align_heads: int = 1
    align_dropout: float = 0.2
    mask_prob: float = 0.2  # bert4rec: share of training positions replaced by the mask token
    diffusion_steps: int = 32  # diffurec: noise levels T
    sample_steps: int = 4  # diffurec: reverse (denoising) steps at inference
    noise_scale: float = 0.1  # diffurec: scale of the inference start noise (lambda of the paper)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.item_mode not in ("id", "title"):
            raise ValueError(f"unknown item_mode {self.item_mode!r}; choose id or title")
        if self.sparse_items and self.backbone == "bert4rec":
            raise ValueError("sparse_items needs a causal backbone (bert4rec's cloze loss reads the whole table)")
        if self.num_items < 1:
            raise ValueError("num_items must be >= 1")
        if self.hidden % self.heads or self.hidden % self.align_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads} and "
                             f"align_heads={self.align_heads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)
