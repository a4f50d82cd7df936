"""The Python API: run LANE's stages from a notebook or a script, then recommend and explain from a trained run.

    from lane_ray import Pipeline, Recommender, load_config

    pipe = Pipeline(load_config(values={"run.out": "runs/nb", "data.dataset": "ml-100k"}))
    pipe.run()                                   # or pipe.prepare(), pipe.embed(), pipe.preferences(), ...
    rec = Recommender.from_run("runs/nb")        # the `lane` (SASRec + alignment) checkpoint
    rec.recommend(user_id=1, k=10)               # [{"rank", "item_id", "title", "score", ...}, ...]
    rec.recommend(history=["Toy Story (1995)", 50], k=5)
    rec.explain(item_id=181, user_id=1)          # the model's reasons, worded by the LLM

``lane`` (the CLI) and the cluster jobs wrap the same functions (:mod:`lane_ray.pipeline.stages`); Ray Serve's
deployments hold the same cores (:mod:`lane_ray.serving`). Every stage is skipped when its output is current.
docs/python_api.md has a worked example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lane_ray.config import LaneConfig, load_config, with_values


class Pipeline:
    """The stages of one run directory (``config.run.out``), each callable alone, in order, or all by :meth:`run`.
    ``quiet`` silences the progress lines on stderr. A run directory given as a URI (``s3://...``) is staged in a
    local folder and pushed after every stage."""

    def __init__(self, config: LaneConfig | None = None, quiet: bool = False) -> None:
        from lane_ray.storage import open_run

        self.config = (config if config is not None else load_config()).model_copy(deep=True)
        # an absolute local folder (Ray workers do not share this process's working directory), or a URI's
        # local staging folder
        self.config.run.out = open_run(self.config.run.out, self.config.run.stage_dir)
        self.quiet = quiet

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.out)

    def prepare(self, force: bool = False) -> dict[str, Any]:
        """The canonical tables in ``RUN/data``; the preparation summary."""
        from lane_ray.pipeline import stages

        return stages.prepare_data(self.config, self.quiet, force=force)

    def embed(self) -> dict[str, Any]:
        """Title embeddings of the catalogue (``RUN/item_embeddings.parquet``); the stage's manifest."""
        from lane_ray.pipeline import stages

        catalog, dest = stages.embedding_paths(str(self.run_dir), None, self.config.run.out)
        return stages.embed_catalog(self.config, catalog, dest, self.quiet, self.run_dir)

    def preferences(self) -> dict[str, Any]:
        """LLM preferences of every user's train prefix, and their embeddings; the stage's manifest."""
        from lane_ray.pipeline import stages

        return stages.extract_preferences(self.config, self.quiet)

    def train(self, variant: str | None = None, backbone: str | None = None, force: bool = False) -> dict[str, Any]:
        """Train and evaluate one variant (default: the config's) with Ray Train, preparing whatever it needs
        first; its ``metrics.json`` entry. A variant whose training inputs are unchanged is not retrained unless
        ``force``."""
        from lane_ray.pipeline import stages

        cfg = with_values(self.config, {f"train.{k}": v for k, v in (("variant", variant), ("backbone", backbone))
                                        if v is not None})
        return stages.train_and_evaluate(cfg, self.quiet, skip_current=not force)

    def evaluate(self, checkpoints: list[str | Path] | None = None, faithfulness: bool = False) -> dict[str, Any]:
        """Evaluate checkpoints (default: all of ``RUN/checkpoints``); ``{"results": {key: metrics}, ...}``."""
        from lane_ray.pipeline import stages

        return stages.evaluate_checkpoints(self.config, checkpoints, faithfulness, self.quiet)

    def explain(self, users: int | None = None) -> dict[str, Any]:
        """Explanations of the candidates' top ranks (``RUN/candidates.parquet``, written by training the ``lane``
        variant) for the first ``users`` users (default: the config's ``explain.max_users``); the checks' summary."""
        from lane_ray.pipeline import stages

        cfg = with_values(self.config, {"explain.max_users": users} if users is not None else {})
        return stages.explain_candidates(cfg, self.run_dir / "candidates.parquet", self.quiet)

    def report(self, out: str | Path | None = None) -> Path:
        """The run's markdown report with its plots; its path."""
        from lane_ray.report import write_run_report

        return Path(write_run_report(self.run_dir, out))

    def run(self, force: bool = False) -> dict[str, Any]:
        """The whole pipeline (what ``lane run`` does); ``{"run_dir", "report", "stats"}``."""
        from lane_ray.pipeline import stages

        return stages.run_pipeline(self.config, self.quiet, force=force)

    def recommender(self, checkpoint: str = "lane") -> Recommender:
        """A :class:`Recommender` over this run's ``checkpoint``."""
        return Recommender.from_run(self.run_dir, checkpoint, self.config)


class Recommender:
    """Ranking and explanation from a trained run, in this process: a known user by id, or a new user by a
    history of item ids and titles (titles match exactly or by title embedding). A history's preferences come
    from the configured LLM on first use (loaded then, cached per history). Errors are
    :class:`~lane_ray.serving.RequestError` naming the field, as the HTTP API's 4xx bodies do."""

    def __init__(self, ranker: Any, config: LaneConfig, run_dir: Path) -> None:
        self.ranker = ranker
        self.config = config
        self.run_dir = run_dir
        self._extractor: Any = None
        self._explainer: Any = None
        self._backend: Any = None  # one LLM for preferences and explanations, loaded on first use

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "lane", config: LaneConfig | None = None) -> Recommender:
        """Load ``checkpoint`` (a name under ``RUN/checkpoints`` or a path) with the run's data, item table and
        stored preferences. ``config`` (default: the run's own ``config.yaml`` when it has one) supplies the LLM
        and serving settings."""
        from lane_ray.serving import RankerCore

        run = Path(run_dir)
        if config is None:
            config = load_config(run / "config.yaml") if (run / "config.yaml").exists() else load_config()
        s = config.serve
        ranker = RankerCore(run, checkpoint, config.embed.model, None, s.title_min_similarity,
                            attribution_window=s.attribution_window)
        return cls(ranker, config, run)

    @property
    def aligned(self) -> bool:
        """Whether the model ranks with preferences (the LANE alignment layer)."""
        return self.ranker.aligned

    def _query(self, user_id: int | None, history: list[int | str] | None, k: int,
               target_item: int | None = None) -> dict[str, Any]:
        from lane_ray.serving import RequestError, ServeQuery

        if (user_id is None) == (history is None):
            raise RequestError(422, "user_id", "give exactly one of user_id and history")
        if user_id is not None:
            q = ServeQuery(k, user_id=int(user_id), target_item=target_item, with_history=True)
        else:
            dense, matches = self.ranker.resolve(list(history or []))
            prefs = None
            if self.aligned:
                p = self._preference_core().extract(self.ranker.history_items(dense))
                prefs = p["vectors"]
            q = ServeQuery(k, history=dense, prefs=prefs, target_item=target_item, with_history=True)
        res = self.ranker.serve([q])[0]
        if "error" in res:
            e = res["error"]
            raise RequestError(e["status"], e.get("field"), e["message"])
        if history is not None:
            res["matches"] = matches
            res["preferences"] = p["preferences"] if self.aligned else []
        return res

    def _llm(self) -> Any:
        if self._backend is None:
            from lane_ray.llm import backend_kwargs, make_backend

            self._backend = make_backend(self.config.llm.backend, **backend_kwargs(self.config.llm))
        return self._backend

    def _preference_core(self) -> Any:
        if self._extractor is None:
            from lane_ray.data import read_prepared
            from lane_ray.serving import PreferenceCore

            self._extractor = PreferenceCore(self.config, read_prepared(self.run_dir).catalog, self._llm())
        return self._extractor

    def recommend(self, user_id: int | None = None, history: list[int | str] | None = None,
                  k: int = 10) -> list[dict[str, Any]]:
        """The top ``k`` items for a known ``user_id`` or a ``history``, best first: ``rank``, ``item_id``,
        ``title``, ``score`` and, for a LANE model, the item's attribution (``pref_contrib``, ``pref_share``,
        ``evidence``)."""
        from lane_ray.serving import ranked_items

        return ranked_items(self._query(user_id, history, k))

    def explain(self, item_id: int, user_id: int | None = None, history: list[int | str] | None = None,
                llm: bool = True) -> dict[str, Any]:
        """Why the model ranks ``item_id`` where it does for this user: the explanation row (``steps``,
        ``reason``, ``likelihood``, ``main_preference``, ``evidence_item_ids``, ``source``: ``llm`` or
        ``template``) built on the model's attribution. ``llm=False`` gives the template explanation, which
        states the attribution without a language model."""
        from lane_ray.llm.explain import settings_from_config
        from lane_ray.serving import ExplainerCore, explain_request, template_row

        res = self._query(user_id, history, 1, target_item=int(item_id))
        target = res["target"]
        att = target.get("attribution")
        req = explain_request(user_id, res["target_meta"], target["rank"], target["score"], res["history_items"],
                              res.get("preferences", []), res.get("weights"), att)
        if not llm:
            return template_row(req, settings_from_config(self.config))
        if self._explainer is None:
            self._explainer = ExplainerCore(self.config, self._llm())
        return self._explainer.explain([req])[0]


__all__ = ["LaneConfig", "Pipeline", "Recommender", "load_config"]
