"""LANE-Ray: explainable sequential recommendation (LANE) at cluster scale on Ray.

Importing this package is cheap: it loads none of ray, torch, vllm or sentence-transformers.
Heavy dependencies are imported inside the functions that need them.
"""

__version__ = "0.1.0"

from lane_ray.errors import ConfigError, DataError, LaneError

__all__ = ["ConfigError", "DataError", "LaneError", "__version__"]
