"""The LANE Ray Serve application: Ingress (FastAPI) → Ranker, PreferenceExtractor, Explainer.

    serve run serve.app:build_app run_dir=runs/default          # or: lane serve --run runs/default
    serve deploy serve/config.yaml

``build_app(args)`` takes ``run_dir`` (required), ``config`` (a LANE YAML file) and ``set`` (``section.field=value``
overrides, a list or one string separated by spaces); the ``serve`` section of that configuration sizes the
deployments and sets the API's limits, the ``llm`` section the backend of both LLM deployments.
"""

# No `from __future__ import annotations` here: the Ingress class is shipped to its replica by value, where
# FastAPI must resolve the route annotations, and string annotations would not resolve there.
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from lane_ray.serving import (
    ExplainerCore,
    PreferenceCore,
    RankerCore,
    RequestError,
    ServeQuery,
    explain_request,
    ranked_items,
    template_row,
)
from serve.metrics import ServeMetrics
from serve.schemas import (
    ErrorBody,
    ExplainBody,
    ExplainResponse,
    Health,
    ItemOut,
    RecommendRequest,
    RecommendResponse,
)

PAGE = Path(__file__).with_name("page.html")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in (401, 404, 413, 422)}


def _config(cfg_json: str) -> Any:
    from lane_ray.config import LaneConfig

    return LaneConfig.model_validate_json(cfg_json)


@serve.deployment(name="Ranker")
class Ranker:
    """Loads the checkpoint and the item table once; scores batches of users against the whole catalogue."""

    def __init__(self, run_dir: str, cfg_json: str) -> None:
        cfg = _config(cfg_json)
        s = cfg.serve
        self.core = RankerCore(run_dir, s.checkpoint, cfg.embed.model, s.ranker_threads or 1, s.title_min_similarity,
                               s.ann_index, s.ann_ef_search, s.ann_nprobe, s.ann_margin,
                               attribution_window=s.attribution_window)
        self.rank.set_max_batch_size(s.ranker_max_batch_size)
        self.rank.set_batch_wait_timeout_s(s.ranker_batch_wait_s)

    def info(self) -> dict[str, Any]:
        return {"model": self.core.name, "items": len(self.core.index), "users": self.core.num_users,
                "aligned": self.core.aligned}

    async def resolve(self, history: list[int | str]) -> dict[str, Any]:
        # titles are matched by encoding them (a torch forward): off the replica's event loop, like rank
        return await asyncio.to_thread(self._resolve, history)

    def _resolve(self, history: list[int | str]) -> dict[str, Any]:
        try:
            dense, matches = self.core.resolve(history)
        except RequestError as e:
            return {"error": e.to_dict()}
        return {"history": dense, "matches": matches, "items": self.core.history_items(dense)}

    def item(self, item_id: int) -> dict[str, Any]:
        try:
            return self.core.item(item_id)
        except RequestError as e:
            return {"error": e.to_dict()}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def rank(self, queries: list[ServeQuery]) -> list[dict[str, Any]]:
        # the forward pass runs in a worker thread: on the event loop it would hold every other request of this
        # replica (health checks, the next batch's arrivals) until it ends
        return await asyncio.to_thread(self.core.serve, queries)


@serve.deployment(name="PreferenceExtractor")
class PreferenceExtractor:
    """LLM preferences for users given only a history, on demand, cached by history."""

    def __init__(self, run_dir: str, cfg_json: str) -> None:
        from lane_ray.data import read_prepared

        self.core = PreferenceCore(_config(cfg_json), read_prepared(run_dir).catalog)

    async def extract(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return await asyncio.to_thread(self.core.extract, items)


@serve.deployment(name="Explainer")
class Explainer:
    """Explanations that state the Ranker's attribution, through the configured LLM backend."""

    def __init__(self, cfg_json: str) -> None:
        self.core = ExplainerCore(_config(cfg_json))

    async def label(self) -> str:
        return self.core.label

    async def explain(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.core.explain, requests)


def _error(status: int, field: str | None, message: str) -> JSONResponse:
    return JSONResponse(ErrorBody(error=message, field=field).model_dump(), status_code=status)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [p for p in loc if p not in ("body", "path", "query", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not (p.startswith("function-") or p in {"int", "str", "constrained-str"}):
            out += ("." if out else "") + p
    return out or "body"


class Guard:
    """Pure ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware on every request): the API key on /v1/
    routes, and the body size limit, checked on the declared length and on the bytes actually received."""

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    @staticmethod
    async def _refuse(send: Any, status: int, field: str, message: str) -> None:
        await _error(status, field, message)({"type": "http"}, None, send)  # the routes' error body, as ASGI

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1/") and headers.get(b"x-api-key") != self.api_key:
            return await self._refuse(send, 401, "X-API-Key", "missing or wrong API key in the X-API-Key header")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"body larger than {self.max_body_bytes} bytes"
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._refuse(send, 413, "body", too_big)
        chunks, size, more = [], 0, True
        while more:  # buffer the body (at most the limit), then hand it on in one message
            msg = await receive()
            if msg["type"] != "http.request":
                return None  # the client went away
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._refuse(send, 413, "body", too_big)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def make_api(max_body_bytes: int, api_key: str | None) -> FastAPI:
    """The FastAPI app with its error handlers and middleware (routes are added by :class:`Ingress`)."""
    api = FastAPI(title="LANE-Ray", version="1",
                  description="Explainable sequential recommendation: rank a user's next items and explain them "
                  "with the preferences the model's alignment layer weighed.")

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        field = _loc(first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            field, msg = "body", "body is not valid JSON"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return _error(422, field, f"{field}: {msg}{more}")

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        field = {404: "path", 405: "method"}.get(exc.status_code)
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(exc.status_code, field, what.get(exc.status_code, str(exc.detail)))

    api.add_middleware(Guard, max_body_bytes=max_body_bytes, api_key=api_key)
    return api


def _cause(exc: BaseException) -> str:
    """``Type: first line`` of the error a replica raised (Ray wraps it in a RayTaskError)."""
    inner = getattr(exc, "cause", None) or exc
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[-1][:200] if lines else ''}".rstrip(": ")


def _raise_if_error(res: dict[str, Any]) -> dict[str, Any]:
    if isinstance(res, dict) and "error" in res and isinstance(res["error"], dict):
        e = res["error"]
        raise RequestError(e["status"], e["field"], e["error"])
    return res


def build_ingress(api: FastAPI) -> type:
    """The Ingress deployment class over ``api`` (FastAPI needs the app when the class is decorated)."""

    @serve.deployment(name="Ingress")
    @serve.ingress(api)
    class Ingress:
        def __init__(self, ranker: DeploymentHandle, extractor: DeploymentHandle, explainer: DeploymentHandle,
                     cfg_json: str) -> None:
            from lane_ray.llm.explain import settings_from_config

            self.ranker, self.extractor, self.explainer = ranker, extractor, explainer
            self.cfg = _config(cfg_json)
            self.s = self.cfg.serve
            self.explain_settings = settings_from_config(self.cfg)
            self._info: dict[str, Any] | None = None
            self.metrics = ServeMetrics()

        async def _ranked(self, route: str, query: ServeQuery) -> dict[str, Any]:
            t0 = time.perf_counter()
            res = await self.ranker.rank.remote(query)
            self.metrics.ranked(route, time.perf_counter() - t0)
            return _raise_if_error(res)

        async def _ranker_info(self) -> dict[str, Any]:
            if self._info is None:
                self._info = await self.ranker.info.remote()
            return self._info

        def _check_limits(self, body: RecommendRequest | ExplainBody) -> None:
            if body.history is not None and len(body.history) > self.s.max_history:
                raise RequestError(422, "history", f"history: at most {self.s.max_history} entries, got "
                                   f"{len(body.history)}")
            if isinstance(body, RecommendRequest):
                if body.k > self.s.max_k:
                    raise RequestError(422, "k", f"k: at most {self.s.max_k}, got {body.k}")
                if body.explain and body.explain_top > min(self.s.max_explain, body.k):
                    raise RequestError(422, "explain_top", f"explain_top: at most {min(self.s.max_explain, body.k)}"
                                       f" (serve.max_explain and k), got {body.explain_top}")

        async def _rank(self, route: str, body: RecommendRequest | ExplainBody, k: int,
                        target_item: int | None = None, with_history: bool = False) -> dict[str, Any]:
            """One Ranker call for a known user; for a raw history: resolve, LLM preferences (degrading to none
            on failure or timeout), then the Ranker call. Returns the Ranker's answer plus ``who``."""
            info = await self._ranker_info()
            if body.user_id is not None:
                res = await self._ranked(route, ServeQuery(k, user_id=body.user_id, target_item=target_item,
                                                           with_history=with_history))
                prefs = res.get("preferences", [])
                res["who"] = {"user_id": body.user_id, "matches": None, "preferences": prefs,
                              "source": "stored" if prefs else "none", "status": None,
                              "note": None if prefs or not info["aligned"] else "no stored preferences"}
                return res
            r = _raise_if_error(await self.ranker.resolve.remote(list(body.history or [])))
            who = {"user_id": None, "matches": r["matches"], "preferences": [], "source": "none", "status": None,
                   "note": None}
            vectors = None
            if not info["aligned"]:
                who["note"] = "the served model does not use preferences"
            else:
                try:
                    p = await asyncio.wait_for(self.extractor.extract.remote(r["items"]),
                                               self.s.preference_timeout_s)
                    who.update(preferences=p["preferences"], source="llm", status=p["status"])
                    vectors = p["vectors"]
                except TimeoutError:
                    self.metrics.timeout(route, "preferences")
                    who["note"] = f"preference extraction timed out after {self.s.preference_timeout_s:g} s"
                except Exception as exc:  # noqa: BLE001 - any LLM failure degrades to ranking without preferences
                    who["note"] = f"preference extraction failed: {_cause(exc)}"
            res = await self._ranked(route, ServeQuery(k, history=r["history"], prefs=vectors, target_item=target_item))
            res["history_items"] = r["items"]
            res["who"] = who
            return res

        async def _explain(self, route: str, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            from lane_ray.llm.explain_checks import compute_checks

            reason = None
            try:
                rows = await asyncio.wait_for(self.explainer.explain.remote(reqs), self.s.explain_timeout_s)
            except TimeoutError:
                self.metrics.timeout(route, "explanations")
                rows, reason = None, f"the LLM did not answer within {self.s.explain_timeout_s:g} s"
            except Exception as exc:  # noqa: BLE001 - an LLM failure must degrade, never 5xx
                rows, reason = None, f"the LLM failed: {_cause(exc)}"
            if rows is None:
                rows = [template_row(r, self.explain_settings) for r in reqs]
            self.metrics.fallback(route, sum(row["source"] == "template" for row in rows))
            checks = compute_checks(rows, self.cfg.explain.not_copied_threshold)
            out = []
            for row, chk in zip(rows, checks, strict=True):
                degraded = reason if row["source"] == "template" else None
                if row["source"] == "template" and degraded is None:
                    degraded = "the LLM's replies did not parse" if row.get("raw") else "no preferences to explain"
                out.append({"item_id": row["item_id"], "rank": row["rank"], "title": row["title"],
                            "steps": row["steps"], "likelihood": row["likelihood"], "reason": row["reason"],
                            "fit": row["fit"], "source": row["source"], "degraded_reason": degraded,
                            "checks": chk, "main_preference": row["main_preference"],
                            "evidence_item_ids": row["evidence_item_ids"], "preferences": row["preferences"],
                            "labels": row["labels"], "pref_contrib": row["pref_contrib"],
                            "pref_share": row["pref_share"], "attribution": row["attribution"]})
            return out

        @api.post("/v1/recommend", response_model=RecommendResponse,
                  responses=ERROR_RESPONSES)
        async def recommend(self, body: RecommendRequest) -> Any:
            try:
                self._check_limits(body)
                res = await self._rank("recommend", body, body.k, with_history=body.explain)
                who = res["who"]
                items = ranked_items(res)
                explanations = []
                if body.explain and items:
                    atts = res.get("attribution") or [None] * len(items)
                    reqs = [explain_request(who["user_id"], res["meta"][n], n + 1, res["scores"][n],
                                            res["history_items"], who["preferences"], res["weights"], atts[n])
                            for n in range(min(body.explain_top, len(items)))]
                    explanations = await self._explain("recommend", reqs)
            except RequestError as e:
                self.metrics.request("recommend", e.status)
                return _error(e.status, e.field, e.message)
            self.metrics.request("recommend", 200)
            info = await self._ranker_info()
            return {"user_id": who["user_id"], "model": info["model"], "history": who["matches"],
                    "preferences": who["preferences"], "preference_source": who["source"],
                    "preference_status": who["status"], "preference_note": who["note"],
                    "preference_weights": res["weights"], "items": items, "explanations": explanations}

        @api.post("/v1/explain", response_model=ExplainResponse,
                  responses=ERROR_RESPONSES)
        async def explain(self, body: ExplainBody) -> Any:
            try:
                self._check_limits(body)
                if body.history is not None:  # refuse an unknown item before any LLM work
                    _raise_if_error(await self.ranker.item.remote(body.item_id))
                res = await self._rank("explain", body, 1, target_item=body.item_id, with_history=True)
                who, t, meta = res["who"], res["target"], res["target_meta"]
                req = explain_request(who["user_id"], meta, t["rank"], t["score"], res["history_items"],
                                      who["preferences"], res["weights"], t.get("attribution"))
                explanation = (await self._explain("explain", [req]))[0]
            except RequestError as e:
                self.metrics.request("explain", e.status)
                return _error(e.status, e.field, e.message)
            self.metrics.request("explain", 200)
            return {"user_id": who["user_id"], "history": who["matches"],
                    "item": {"rank": t["rank"], "item_id": body.item_id, "title": meta["title"], "score": t["score"],
                             **t.get("attribution", {})},
                    "preferences": who["preferences"], "preference_weights": res["weights"],
                    "explanation": explanation}

        @api.get("/v1/items/{item_id}", response_model=ItemOut,
                 responses={c: ERROR_RESPONSES[c] for c in (401, 404, 422)})
        async def item(self, item_id: int) -> Any:
            try:
                out = _raise_if_error(await self.ranker.item.remote(item_id))
            except RequestError as e:
                self.metrics.request("items", e.status)
                return _error(e.status, e.field, e.message)
            self.metrics.request("items", 200)
            return out

        @api.get("/healthz", response_model=Health)
        async def healthz(self) -> Any:
            info = await self._ranker_info()
            label = await self.explainer.label.remote()
            return {"status": "ok", "model": info["model"], "items": info["items"], "users": info["users"],
                    "llm": label}

        @api.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def page(self) -> Any:
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return Ingress


def _overrides(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
    return [str(v) for v in value]


def replica_scaling(replicas: int, max_replicas: int | None, target: float) -> dict[str, Any]:
    """``num_replicas`` or, when a larger maximum is configured, an autoscaling config."""
    if max_replicas is None or max_replicas <= replicas:
        return {"num_replicas": replicas}
    return {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                   "target_ongoing_requests": target}}


def explainer_gpus(configured: float | None, backend: str) -> float:
    """GPUs per Explainer replica: as configured, else 1 for a local (transformers) LLM on a cluster with GPUs."""
    if configured is not None:
        return configured
    if backend != "transformers":
        return 0.0
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build_app(args: dict[str, Any]) -> Any:
    """The application for ``serve run`` / ``serve deploy`` / :func:`lane_ray.cli` (``lane serve``)."""
    from lane_ray.config import load_config
    from lane_ray.errors import ConfigError, DataError

    args = dict(args or {})
    unknown = set(args) - {"run_dir", "config", "set"}
    if unknown:
        raise ConfigError(f"build_app: unknown argument(s) {', '.join(sorted(unknown))} (run_dir, config, set)")
    if not args.get("run_dir"):
        raise ConfigError("build_app: the argument run_dir is required")
    run_dir = Path(str(args["run_dir"])).expanduser().resolve()
    if not run_dir.is_dir():
        raise DataError("run directory not found", file=run_dir)
    cfg = load_config(args.get("config"), _overrides(args.get("set")))
    s = cfg.serve
    api_key = None
    if s.api_key_env:
        api_key = os.environ.get(s.api_key_env)
        if not api_key:
            raise ConfigError(f"serve.api_key_env names {s.api_key_env}, which is not set in the environment")
    cfg_json = cfg.model_dump_json()
    common = {"max_ongoing_requests": s.max_ongoing_requests, "graceful_shutdown_timeout_s": s.graceful_shutdown_s}
    ranker = Ranker.options(**replica_scaling(s.ranker_replicas, s.ranker_max_replicas, s.target_ongoing_requests),
                            ray_actor_options={"num_cpus": s.ranker_num_cpus}, **common).bind(str(run_dir), cfg_json)
    extractor = PreferenceExtractor.options(ray_actor_options={"num_cpus": 0.25},
                                            **common).bind(str(run_dir), cfg_json)
    n_gpus = explainer_gpus(s.explainer_num_gpus, cfg.llm.backend)
    gpus = {"num_gpus": n_gpus} if n_gpus else {}
    explainer = Explainer.options(**replica_scaling(s.explainer_replicas, s.explainer_max_replicas,
                                             s.target_ongoing_requests),
                                  ray_actor_options={"num_cpus": s.explainer_num_cpus, **gpus},
                                  **common).bind(cfg_json)
    ingress = build_ingress(make_api(s.max_body_bytes, api_key))
    return ingress.options(ray_actor_options={"num_cpus": 0.25}, **common).bind(ranker, extractor, explainer,
                                                                                cfg_json)


def wait_healthy(url: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Poll ``url``/healthz until it answers 200; returns its body."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=10) as r:
                return json.loads(r.read())
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s:g} s: {last}")


def serve_forever(cfg: Any, run_dir: str, args: dict[str, Any], on_ready: Any = None) -> int:
    """`lane serve`: the app of ``args`` (:func:`build_app`) on the Ray cluster of ``cfg.ray``, at
    ``cfg.serve.host:port``, until SIGINT or SIGTERM. ``on_ready(url)`` is called once it answers /healthz."""
    import signal
    import threading

    from lane_ray.console import log
    from lane_ray.errors import DataError
    from lane_ray.pipeline.cluster import init_ray

    if not (Path(run_dir) / "checkpoints").is_dir():
        raise DataError("no checkpoints in this run directory (run `lane run` or `lane train` first)", file=run_dir)
    if cfg.serve.throughput_optimized:
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # read by the cluster init_ray may start
    init_ray(cfg.ray)
    s = cfg.serve
    app = build_app(args)
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(app, name="lane", route_prefix="/", blocking=False)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    url = f"http://{host}:{s.port}/"
    wait_healthy(url)
    log(f"serve: ready ({url}docs for the API); Ctrl-C stops it")
    if on_ready is not None:
        on_ready(url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0
