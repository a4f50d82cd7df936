"""LANE-Ray: explainable sequential recommendation (LANE) at cluster scale on Ray.

Importing this package is cheap: it loads none of ray, torch, vllm or sentence-transformers.
Heavy dependencies are imported inside the functions that need them. The Python API (:mod:`lane_ray.api`):
``from lane_ray import Pipeline, Recommender, load_config``.
"""

from typing import Any

__version__ = "0.1.0"

from lane_ray.errors import ConfigError, DataError, LaneError

_API = ("LaneConfig", "Pipeline", "Recommender", "load_config")


def __getattr__(name: str) -> Any:  # the API loads on first use, so `import lane_ray` stays cheap
    if name in _API:
        from lane_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'lane_ray' has no attribute {name!r}")


__all__ = ["ConfigError", "DataError", "LaneConfig", "LaneError", "Pipeline", "Recommender", "__version__",
           "load_config"]
