"""Recommendation from a trained run, without Ray: resolve users and histories, score them against the whole
catalogue (exactly, or through an ANN index: :mod:`lane_ray.index`), extract preferences for raw histories,
explain one ranked item. The Python API (:class:`lane_ray.api.Recommender`) and the Ray Serve deployments
(``serve/app.py``) each hold these cores; this module knows nothing of the app.

Everything a request can get wrong raises :class:`RequestError` (HTTP status, field, one-line message), which the
Ingress turns into a 4xx body naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lane_ray.errors import DataError
from lane_ray.models.checkpoints import resolve_checkpoint

_SPACES = re.compile(r"\s+")


class RequestError(Exception):
    """A request the API refuses: ``status`` (4xx), the offending ``field`` and a one-line ``message``."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "field": self.field, "error": self.message}


def normalise_title(title: str) -> str:
    return _SPACES.sub(" ", title).strip().casefold()


@dataclass
class RankQuery:
    """One user to score: dense history indices (oldest first), optional preference vectors ``[m, D]``, how many
    items to return and, optionally, a target item whose rank and score are wanted."""

    history: list[int]
    k: int
    prefs: np.ndarray | None = None
    target: int | None = None  # dense index


@dataclass
class ServeQuery:
    """What the Ingress asks the Ranker in one call: a known ``user_id`` (resolved here) or a resolved ``history``
    with its preference vectors; ``target_item`` (a catalogue id) to rank one item; ``with_history`` to get the
    history's catalogue entries back (explanations need them)."""

    k: int
    user_id: int | None = None
    history: list[int] | None = None
    prefs: np.ndarray | None = None
    target_item: int | None = None
    with_history: bool = False


@dataclass
class KnownUser:
    row: int
    history: list[int]  # dense indices, whole sequence (train, valid and test items: serving predicts the next)
    preferences: list[str]
    prefs: np.ndarray | None  # [m, D] stored preference vectors (present slots only)


@dataclass
class Catalogue:
    """Item ids, titles and attributes in dense-index order (index k = ``item_ids[k - 1]``)."""

    item_ids: np.ndarray
    titles: list[str]
    genres: list[str | None]
    years: list[str | None]
    by_title: dict[str, int] = field(default_factory=dict)  # normalised title -> dense index (first one)

    def dense(self, item_id: int) -> int | None:
        pos = int(np.searchsorted(self.item_ids, item_id))
        return pos + 1 if pos < self.item_ids.size and int(self.item_ids[pos]) == item_id else None

    def meta(self, dense: int) -> dict[str, Any]:
        k = dense - 1
        return {"item_id": int(self.item_ids[k]), "title": self.titles[k], "genres": self.genres[k],
                "year": self.years[k]}


def load_catalogue(catalog: Any, item_ids: np.ndarray) -> Catalogue:
    """A :class:`Catalogue` over ``item_ids`` (the model's item index) from the run's ``catalog`` table; items
    with no catalogue row (seen only in interactions) get an empty title."""
    cols = catalog.column_names
    ids = catalog["item_id"].to_numpy()
    titles = catalog["title"].to_pylist()
    genres = catalog["genres"].to_pylist() if "genres" in cols else [None] * len(titles)
    years = catalog["year"].to_pylist() if "year" in cols else [None] * len(titles)
    row_of = {int(i): r for r, i in enumerate(ids)}
    out = Catalogue(item_ids, [], [], [])
    for k, item in enumerate(item_ids):
        r = row_of.get(int(item))
        out.titles.append((titles[r] or "") if r is not None else "")
        out.genres.append(genres[r] if r is not None else None)
        out.years.append(str(years[r]) if r is not None and years[r] is not None else None)
        keys = [normalise_title(out.titles[-1])]
        if keys[0] and out.years[-1]:
            keys.append(normalise_title(f"{out.titles[-1]} ({out.years[-1]})"))
        for key in keys:
            if key and key not in out.by_title:
                out.by_title[key] = k + 1
    return out


class RankerCore:
    """A trained checkpoint, its item table and the run's users, scoring batches of histories."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "lane",
                 encoder_model: str = "all-MiniLM-L6-v2",
                 threads: int | None = 1, title_min_similarity: float = 0.6, ann_index: str | None = None,
                 ann_ef_search: int = 128, ann_nprobe: int = 32, ann_margin: int = 50, attribution: bool = True,
                 attribution_top: int = 3, attribution_window: int = 20) -> None:
        import torch

        from lane_ray.data import read_prepared
        from lane_ray.models.recommender import load_checkpoint
        from lane_ray.train.features import load_features

        if threads:
            torch.set_num_threads(threads)
        run = Path(run_dir)
        ckpt = resolve_checkpoint(run, checkpoint)
        self.model, self.meta = load_checkpoint(ckpt)
        self.model.eval()
        self.aligned = bool(self.model.cfg.align)
        prepared = read_prepared(run)
        # the split, the item index, title vectors (nearest-title matching) and stored preference vectors exactly
        # as training built them
        feats = load_features(run, titles=(run / "item_embeddings.parquet").exists(), preferences=self.aligned,
                              interactions=prepared.interactions, catalog=prepared.catalog)
        self.split, index = feats.split, feats.index
        if len(index) != self.model.cfg.num_items:
            raise DataError(f"the checkpoint scores {self.model.cfg.num_items} items but the run's data has "
                            f"{len(index)}: checkpoint and data are from different runs", file=ckpt / "config.json")
        self.index = index
        self.catalogue = load_catalogue(prepared.catalog, index.item_ids)
        self.name = ckpt.name
        with torch.no_grad():
            self.table = self.model.items.table().detach().clone()
        self.prefs, self.pref_mask = feats.prefs, feats.pref_mask
        self.preferences = _preference_texts(run / "preferences.parquet") if self.aligned else {}
        self.title_vectors = feats.titles
        self.ann = None
        self.ann_margin = ann_margin
        if ann_index:
            from lane_ray.index import AnnIndex

            path = run / "index" / ckpt.name if ann_index == "auto" else Path(ann_index)
            self.ann = AnnIndex(path, ckpt, ann_ef_search, ann_nprobe)
            if self.ann.meta["items"] != len(index):
                raise DataError(f"the ANN index holds {self.ann.meta['items']} items, the catalogue {len(index)}",
                                file=path / "index.json")
        # item-level attribution of the returned items: the evidence items come from removing each of the
        # `attribution_window` most recent history items, one backbone pass each (20 keeps a query's cost near
        # that of ranking it; lane evaluate's candidates use 50)
        self.attribution, self.attribution_top = attribution, attribution_top
        self.attribution_window = attribution_window
        self.encoder_model = encoder_model
        self.title_min_similarity = title_min_similarity
        self._encoder: Any = None
        self._lock = threading.Lock()

    # -- users and histories ------------------------------------------------------------------------------

    @property
    def num_users(self) -> int:
        return self.split.num_users

    def user(self, user_id: int) -> KnownUser:
        pos = int(np.searchsorted(self.split.user_ids, user_id))
        if pos >= self.split.num_users or int(self.split.user_ids[pos]) != user_id:
            raise RequestError(404, "user_id", f"unknown user_id {user_id} (send a `history` for a new user)")
        seq = self.split.items[self.split.offsets[pos]:self.split.offsets[pos + 1]]
        prefs, texts = None, self.preferences.get(user_id, [])
        if self.prefs is not None and self.pref_mask is not None:
            present = np.flatnonzero(self.pref_mask[pos])  # weights follow the slots that have a vector
            prefs = self.prefs[pos][present]
            texts = [texts[s] if s < len(texts) else f"preference {s + 1}" for s in present]
        return KnownUser(pos, self.index.encode(seq).tolist(), texts, prefs)

    def resolve(self, history: list[int | str]) -> tuple[list[int], list[dict[str, Any]]]:
        """Dense indices of a raw history and how each entry matched; an entry that matches nothing raises."""
        dense: list[int] = []
        matches: list[dict[str, Any]] = []
        unmatched: list[tuple[int, str]] = []
        for n, entry in enumerate(history):
            if isinstance(entry, int):
                d = self.catalogue.dense(entry)
                if d is None:
                    raise RequestError(422, f"history[{n}]", f"item id {entry} is not in the catalogue")
                dense.append(d)
                matches.append({"input": entry, "item_id": entry, "title": self.catalogue.titles[d - 1],
                                "match": "id", "similarity": None})
                continue
            d = self.catalogue.by_title.get(normalise_title(entry))
            if d is not None:
                dense.append(d)
                matches.append({"input": entry, "item_id": int(self.catalogue.item_ids[d - 1]),
                                "title": self.catalogue.titles[d - 1], "match": "exact", "similarity": None})
            else:
                dense.append(0)
                matches.append({})
                unmatched.append((n, entry))
        if unmatched:
            for (n, entry), (d, sim) in zip(unmatched, self._nearest([e for _, e in unmatched]), strict=True):
                if sim < self.title_min_similarity:
                    raise RequestError(422, f"history[{n}]", f"no catalogue title matches {entry[:80]!r} (closest: "
                                       f"{self.catalogue.titles[d - 1][:80]!r}, similarity {sim:.2f} < "
                                       f"{self.title_min_similarity})")
                dense[n] = d
                matches[n] = {"input": entry, "item_id": int(self.catalogue.item_ids[d - 1]),
                              "title": self.catalogue.titles[d - 1], "match": "nearest", "similarity": round(sim, 4)}
        return dense, matches

    def _nearest(self, texts: list[str]) -> list[tuple[int, float]]:
        if self.title_vectors is None:
            raise RequestError(422, "history", "this run has no title embeddings: send item ids or exact titles")
        with self._lock:
            if self._encoder is None:
                from lane_ray.text import TextEncoder

                self._encoder = TextEncoder(self.encoder_model, device="cpu")
        q = self._encoder.encode(texts)
        sims = q @ self.title_vectors.T  # row 0 (padding) is zero
        sims[:, 0] = -2.0
        best = sims.argmax(1)
        return [(int(b), float(sims[i, b])) for i, b in enumerate(best)]

    def history_items(self, dense: list[int]) -> list[dict[str, Any]]:
        return [self.catalogue.meta(d) for d in dense]

    # -- scoring ------------------------------------------------------------------------------------------

    def score(self, queries: list[RankQuery]) -> list[dict[str, Any]]:
        """Top-k of each query in one forward pass: items (dense), scores, alignment weights over the query's
        preferences, and the target's rank and score when asked. Seen items are never returned. With attribution
        on, ``attribution`` holds one :meth:`_attributions` entry per returned item (and the target's under
        ``target``), computed for those items only, from the same backbone states."""
        import torch

        from lane_ray.data.split import pad_left

        L = self.model.cfg.max_len
        B = len(queries)
        hist = torch.from_numpy(pad_left([np.asarray(q.history[-L:], dtype=np.int64) for q in queries], L))
        prefs = mask = None
        if self.aligned:
            m = max([1] + [0 if q.prefs is None else len(q.prefs) for q in queries])
            dim = self.prefs.shape[2] if self.prefs is not None else 0
            p = np.zeros((B, m, dim), dtype=np.float32)
            mk = np.zeros((B, m), dtype=bool)
            for b, q in enumerate(queries):
                if q.prefs is not None and len(q.prefs):
                    p[b, :len(q.prefs)] = q.prefs
                    mk[b, :len(q.prefs)] = True
            prefs, mask = torch.from_numpy(p), torch.from_numpy(mk)
        with torch.no_grad():
            last = self.model.backbone_states(self.model.scoring_inputs(hist), self.table)[:, -1:]  # [B, 1, H]
            rep, w = self.model.user_head(last, prefs, mask, self.table)
            if self.ann is not None and all(q.target is None for q in queries):
                return self._approximate(queries, rep, w, (hist, prefs, mask, last))
            scores = rep @ self.table.T
        scores[:, 0] = float("-inf")
        targets = []
        for b, q in enumerate(queries):  # ranks before the history is masked: the target may be a seen item
            if q.target is None:
                targets.append(None)
                continue
            t_score = float(scores[b, q.target])
            targets.append({"rank": int((scores[b] > t_score).sum()) + 1, "score": t_score})
        seen = [sorted(set(q.history) - {0}) for q in queries]
        for b, idx in enumerate(seen):  # in place: no copy of a catalogue-wide row per query
            if idx:
                scores[b].index_fill_(0, torch.as_tensor(idx, dtype=torch.long), float("-inf"))
        N = scores.shape[1] - 1
        top = scores.topk(min(max(q.k for q in queries), N), dim=1)
        top_idx, top_val = top.indices.tolist(), top.values.tolist()
        out = []
        for b, q in enumerate(queries):
            k = min(q.k, N - len(seen[b]))
            n_pref = 0 if q.prefs is None else len(q.prefs)
            out.append({"items": top_idx[b][:k], "scores": top_val[b][:k],
                        "weights": None if w is None or not n_pref else w[b, :n_pref].tolist(), "target": targets[b]})
        self._attach_attributions(queries, out, (hist, prefs, mask, last))
        return out

    def _attach_attributions(self, queries: list[RankQuery], out: list[dict[str, Any]], state: tuple) -> None:
        """Add ``attribution`` (one entry per returned item, plus ``target`` for a target) to each result, all
        queries in one :func:`~lane_ray.models.attribute` call over the items they return."""
        if not self.attribution:
            return
        import torch

        from lane_ray.models.attribution import attribute

        hist, prefs, mask, last = state
        width = max([len(o["items"]) + (q.target is not None) for q, o in zip(queries, out, strict=True)] + [0])
        if width == 0:
            return
        cand = torch.zeros(len(queries), width, dtype=torch.long)  # padding columns score item 0, never read
        for b, (q, o) in enumerate(zip(queries, out, strict=True)):
            row = list(o["items"]) + ([q.target] if q.target is not None else [])
            cand[b, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        att = attribute(self.model, hist, cand, prefs, mask, self.table, self.attribution_top,
                        self.attribution_window, last=last)
        for b, (q, o) in enumerate(zip(queries, out, strict=True)):
            n_pref = 0 if q.prefs is None else len(q.prefs)
            entries = [self._attribution_entry(att, b, c, n_pref) for c in range(len(o["items"]))]
            o["attribution"] = entries
            if q.target is not None:
                o["target"] = {**(o["target"] or {}), "attribution": self._attribution_entry(att, b, len(entries),
                                                                                             n_pref)}

    def _attribution_entry(self, att: Any, b: int, c: int, n_pref: int) -> dict[str, Any]:
        """``{"pref_contrib": [n_pref], "pref_share", "evidence": [{item_id, title, contrib}]}`` of one item."""
        idx, val = att.history_idx[b, c].tolist(), att.history_contrib[b, c].tolist()
        evidence = [{"item_id": int(self.catalogue.item_ids[d - 1]), "title": self.catalogue.titles[d - 1],
                     "contrib": float(v)} for d, v in zip(idx, val, strict=True) if d > 0]
        return {"pref_contrib": [float(x) for x in att.pref_contrib[b, c, :n_pref].tolist()],
                "pref_share": float(att.pref_share[b, c]), "evidence": evidence}

    def _approximate(self, queries: list[RankQuery], rep: Any, w: Any, state: tuple) -> list[dict[str, Any]]:
        """Top-k among the ANN index's candidates, rescored exactly (the same dot products), seen items removed;
        ``state`` (history, prefs, mask, last backbone state) is what the attributions of the returned items reuse."""
        import torch

        N = len(self.index)
        seen = [set(q.history) - {0} for q in queries]
        K = min(N, max(q.k + len(s) for q, s in zip(queries, seen, strict=True)) + self.ann_margin)
        cand = torch.from_numpy(self.ann.search(rep.numpy(), K))  # [B, K] dense, 0 = none
        scores = torch.einsum("bh,bkh->bk", rep, self.table[cand])
        scores[cand == 0] = float("-inf")
        for b, s in enumerate(seen):
            if s:
                scores[b][torch.isin(cand[b], torch.as_tensor(sorted(s), dtype=torch.long))] = float("-inf")
        order = scores.argsort(dim=1, descending=True)
        out = []
        for b, q in enumerate(queries):
            best = order[b][torch.isfinite(scores[b][order[b]])][:q.k]
            n_pref = 0 if q.prefs is None else len(q.prefs)
            out.append({"items": cand[b][best].tolist(), "scores": scores[b][best].tolist(),
                        "weights": None if w is None or not n_pref else w[b, :n_pref].tolist(), "target": None})
        self._attach_attributions(queries, out, state)
        return out

    def serve(self, queries: list[ServeQuery]) -> list[dict[str, Any]]:
        """Answer a batch of :class:`ServeQuery`: resolution, one forward pass for all that resolve, catalogue
        entries. A query that fails gets ``{"error": ...}`` in its place; the others are unaffected."""
        out: list[dict[str, Any]] = [{} for _ in queries]
        todo: list[tuple[int, RankQuery]] = []
        for n, q in enumerate(queries):
            try:
                target = None
                if q.target_item is not None:
                    target = self.catalogue.dense(q.target_item)
                    if target is None:
                        raise RequestError(404, "item_id", f"item id {q.target_item} is not in the catalogue")
                    out[n]["target_meta"] = self.catalogue.meta(target)
                if q.user_id is not None:
                    u = self.user(q.user_id)
                    history, prefs = u.history, u.prefs
                    out[n]["preferences"] = u.preferences
                else:
                    history, prefs = list(q.history or []), q.prefs
                if q.with_history:
                    out[n]["history_items"] = self.history_items(history)
                todo.append((n, RankQuery(history, q.k, prefs, target)))
            except RequestError as e:
                out[n] = {"error": e.to_dict()}
        if todo:
            for (n, _), res in zip(todo, self.score([rq for _, rq in todo]), strict=True):
                res["meta"] = [self.catalogue.meta(d) for d in res["items"]]
                out[n].update(res)
        return out

    def item(self, item_id: int) -> dict[str, Any]:
        d = self.catalogue.dense(item_id)
        if d is None:
            raise RequestError(404, "item_id", f"item id {item_id} is not in the catalogue")
        return self.catalogue.meta(d)


def ranked_items(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The returned items of one :meth:`RankerCore.serve` answer, best first: ``rank``, ``item_id``, ``title``,
    ``score`` and the item's attribution entry (when the Ranker computed one)."""
    attribution = res.get("attribution") or [{}] * len(res["meta"])
    return [{"rank": n + 1, "item_id": m["item_id"], "title": m["title"], "score": s, **a}
            for n, (m, s, a) in enumerate(zip(res["meta"], res["scores"], attribution, strict=True))]


def _preference_texts(path: Path) -> dict[int, list[str]]:
    if not path.exists():
        return {}
    from lane_ray.io import read_parquet

    t = read_parquet(path, ["user_id", "preferences"])
    return {int(u): list(p or []) for u, p in zip(t["user_id"].to_pylist(), t["preferences"].to_pylist(), strict=True)}


class LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


def history_key(items: list[dict[str, Any]]) -> str:
    return hashlib.sha1(json.dumps([[i["item_id"], i["title"]] for i in items]).encode()).hexdigest()


def _history_items(items: list[dict[str, Any]]) -> list[Any]:
    from lane_ray.llm.prompts import HistoryItem

    return [HistoryItem(i["title"], i.get("genres"), i.get("year")) for i in items]


class PreferenceCore:
    """LLM preferences (and their vectors) for raw histories, cached by history."""

    def __init__(self, cfg: Any, catalog: Any, backend: Any = None) -> None:
        from lane_ray.llm import backend_kwargs, make_backend
        from lane_ray.llm.preferences import settings_from_config
        from lane_ray.text import TextEncoder

        self.backend = backend if backend is not None else make_backend(cfg.llm.backend, **backend_kwargs(cfg.llm))
        self.settings = settings_from_config(cfg.preferences, catalog)
        self.encoder = TextEncoder(cfg.embed.model, device="cpu")
        self.cache = LRU(cfg.serve.preference_cache_size)
        self._lock = threading.Lock()  # one generation at a time per replica

    def extract(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"preferences", "status", "vectors" [m, D], "cached"}`` for a history (catalogue metadata dicts)."""
        from lane_ray.llm.preferences import UserHistory, extract_batch

        key = history_key(items)
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        with self._lock:
            res = extract_batch([UserHistory(0, _history_items(items))], self.backend, self.settings,
                                getattr(self.backend, "count_tokens", None))[0]
        vectors = self.encoder.encode(res.preferences) if res.preferences else np.zeros((0, self.encoder.dim),
                                                                                          np.float32)
        out = {"preferences": list(res.preferences), "status": res.status, "vectors": vectors}
        self.cache.put(key, out)
        return {**out, "cached": False}


class ExplainerCore:
    """Explanations of ranked items that state the Ranker's attribution, through the configured LLM backend."""

    def __init__(self, cfg: Any, backend: Any = None) -> None:
        from lane_ray.llm import backend_kwargs, make_backend
        from lane_ray.llm.explain import settings_from_config

        self.backend = backend if backend is not None else make_backend(cfg.llm.backend, **backend_kwargs(cfg.llm))
        self.settings = settings_from_config(cfg)
        self.label = f"{cfg.llm.backend}:{cfg.llm.model}"
        self._lock = threading.Lock()

    def explain(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Explanation rows (``Explanation.to_row``) for :func:`explain_request` dicts, in order."""
        from lane_ray.llm.explain import explain_batch

        reqs = [to_explain_request(r) for r in requests]
        with self._lock:
            out = explain_batch(reqs, self.backend, self.settings, getattr(self.backend, "count_tokens", None))
        return [e.to_row() for e in out]


def explain_request(user_id: int | None, item: dict[str, Any], rank: int, score: float,
                    history: list[dict[str, Any]], preferences: list[str], weights: list[float] | None,
                    attribution: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain-data explanation request (what travels between deployments). ``attribution`` is the Ranker's
    entry for the item (``pref_contrib``, ``pref_share``, ``evidence``); without one the alignment weights
    stand in for the contributions, flagged ``attribution="alignment weights"`` (no leave-one-out)."""
    n = len(preferences)
    if attribution is not None and len(attribution.get("pref_contrib") or []) == n:
        contrib, share = [float(x) for x in attribution["pref_contrib"]], float(attribution["pref_share"])
        evidence, source = list(attribution.get("evidence") or []), "model"
    else:
        w = list(weights) if weights is not None and len(weights) == n else [1.0] * n
        contrib, share, evidence, source = [max(0.0, float(x)) for x in w], float(n > 0), [], "alignment weights"
    return {"user_id": -1 if user_id is None else int(user_id), "item": item, "rank": int(rank),
            "score": float(score), "history": history, "preferences": list(preferences), "pref_contrib": contrib,
            "pref_share": share, "evidence": evidence, "attribution": source}


def to_explain_request(r: dict[str, Any]) -> Any:
    from lane_ray.llm.explain import ExplainRequest
    from lane_ray.llm.prompts import HistoryItem

    target = _history_items([r["item"]])[0]
    ev = r.get("evidence") or []
    return ExplainRequest(r["user_id"], r["item"]["item_id"], r["rank"], r["score"], target,
                          _history_items(r["history"]), r["preferences"], r["pref_contrib"], r["pref_share"],
                          [int(h["item_id"]) for h in r["history"] if "item_id" in h],
                          [int(e["item_id"]) for e in ev], [float(e["contrib"]) for e in ev],
                          [HistoryItem(e.get("title") or "") for e in ev], None, r.get("attribution", "model"))


def template_row(r: dict[str, Any], settings: Any) -> dict[str, Any]:
    """The explanation that states the attribution alone (no LLM): the degraded answer."""
    from lane_ray.llm.explain import template_explanation

    return template_explanation(to_explain_request(r), settings).to_row()
