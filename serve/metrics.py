"""The serving app's own metrics, exported on Ray's Prometheus endpoint (each node's metrics agent, scraped at
``http://NODE:METRICS_EXPORT_PORT/metrics``) with the ``ray_`` prefix and Serve's tags (application, deployment,
replica) added by ``ray.serve.metrics``:

| metric | type | tags | what |
|---|---|---|---|
| ``ray_lane_requests_total`` | counter | route, status | API requests by route and HTTP status |
| ``ray_lane_template_fallbacks_total`` | counter | route | explanations answered by the template instead of the LLM |
| ``ray_lane_llm_timeouts_total`` | counter | route,stage | LLM calls cut by their timeout (preferences, explanations) |
| ``ray_lane_ranking_latency_ms`` | histogram | route | one Ranker call seen from the Ingress (queue, batch, forward) |
"""

from __future__ import annotations

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class ServeMetrics:
    """The metrics of one Ingress replica (made in its constructor: ``ray.serve.metrics`` needs a replica)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("lane_requests", description="API requests by route and HTTP status.",
                                tag_keys=("route", "status"))
        self.fallbacks = Counter("lane_template_fallbacks", description="Explanations answered by the template "
                                 "instead of the LLM (failure, timeout, unparsable replies, no preferences).",
                                 tag_keys=("route",))
        self.timeouts = Counter("lane_llm_timeouts", description="LLM calls cut by their timeout.",
                                tag_keys=("route", "stage"))
        self.ranking = Histogram("lane_ranking_latency_ms", description="One Ranker call seen from the Ingress "
                                 "(queueing, batching, the forward pass), in milliseconds.",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))

    def request(self, route: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})

    def fallback(self, route: str, n: int = 1) -> None:
        if n:
            self.fallbacks.inc(n, tags={"route": route})

    def timeout(self, route: str, stage: str) -> None:
        self.timeouts.inc(tags={"route": route, "stage": stage})

    def ranked(self, route: str, seconds: float) -> None:
        self.ranking.observe(seconds * 1e3, tags={"route": route})


__all__ = ["LATENCY_BOUNDARIES_MS", "ServeMetrics"]
