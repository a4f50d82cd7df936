"""Ray Serve applications (``build_app(args) -> Application``) for ranking and explanation.

The serving milestone adds the deployments here; nothing in this package runs at import time.
"""
