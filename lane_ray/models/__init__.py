"""Pure torch sequential recommenders: backbones (SASRec, GRU4Rec, BERT4Rec, DiffuRec), item embedders (``id`` or
``title``), the LANE ``PreferenceAlignment`` layer, item-level attribution (:func:`attribute`) and self-describing
checkpoints. No Ray and no I/O other than :func:`save` / :func:`load` of a checkpoint directory."""

from lane_ray.models.attribution import Attribution, attribute
from lane_ray.models.config import BACKBONES, ModelConfig
from lane_ray.models.recommender import SequentialRecommender, load_checkpoint, save_checkpoint

__all__ = ["BACKBONES", "Attribution", "ModelConfig", "SequentialRecommender", "attribute", "load_checkpoint",
           "save_checkpoint"]
