"""Sentence encoding of item titles and preference texts (sentence-transformers, offline only)."""

from lane_ray.text.encoder import DEFAULT_MODEL, ModelNotFoundError, TextEncoder, encoder_id, locate_model

__all__ = ["DEFAULT_MODEL", "ModelNotFoundError", "TextEncoder", "encoder_id", "locate_model"]
