"""Pure epoch functions: training, evaluation under both protocols, faithfulness. No Ray; the Ray Train loop
(``lane_ray.pipeline.train``) and the in-process experiments drive the same :class:`TrainingRun`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lane_ray.models import ModelConfig, SequentialRecommender
from lane_ray.train.features import Features
from lane_ray.train.metrics import rank_metrics, target_ranks

Protocol = Literal["full", "sampled100"]
PROTOCOLS: tuple[Protocol, ...] = ("full", "sampled100")


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: Literal["bce", "ce"] = "ce"
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    eval_batch_size: int = 256
    seed: int = 0
    eval_users: int | None = None  # evaluate on this fixed sample of users (eval_rows); None = all

    @classmethod
    def of(cls, tc: Any) -> FitSettings:
        """The settings of a :class:`~lane_ray.config.TrainConfig`."""
        return cls(epochs=tc.epochs, batch_size=tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay, loss=tc.loss,
                   patience=tc.patience, eval_batch_size=tc.eval_batch_size, seed=tc.seed, eval_users=tc.eval_users)


def eval_rows(num_users: int, n: int | None) -> np.ndarray | None:
    """The split rows evaluation uses: all (None), or a sorted sample of ``n`` drawn with a fixed seed, so every
    variant, seed and epoch is measured on the same users."""
    if n is None or n >= num_users:
        return None
    return np.sort(np.random.default_rng(20240702).choice(num_users, size=n, replace=False))


class _Optimizers:
    """Adam for dense parameters and SparseAdam for a sparse item table, stepped and saved as one optimizer."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.parts = [dense, sparse]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, s in zip(self.parts, state["parts"], strict=True):
            o.load_state_dict(s)


def make_optimizer(model: SequentialRecommender, lr: float, weight_decay: float = 0.0) -> Any:
    """Adam over the model; with a sparse item table (``sparse_items``) that table gets SparseAdam (lazy Adam: a
    row's moments move when the row is used), so a step costs the rows a batch touches, not the catalogue."""
    if not (model.cfg.sparse_items and model.cfg.item_mode == "id"):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if weight_decay:
        raise ValueError("sparse_items: SparseAdam has no weight decay; set weight_decay to 0")
    table = model.items.table_.weight
    rest = [p for p in model.parameters() if p is not table]
    return _Optimizers(torch.optim.Adam(rest, lr=lr), torch.optim.SparseAdam([table], lr=lr))


def model_config(variant: str, num_items: int, backbone: str, **arch: Any) -> ModelConfig:
    """The architecture of an ablation variant: ``id``, ``title``, ``lane`` (title + alignment), ``lane-shuffled``."""
    if variant not in ("id", "title", "lane", "lane-shuffled"):
        raise ValueError(f"unknown variant {variant!r}; choose id, title, lane or lane-shuffled")
    return ModelConfig(num_items=num_items, backbone=backbone,  # type: ignore[arg-type]
                       item_mode="id" if variant == "id" else "title", align=variant.startswith("lane"), **arch)


def _prefs(feats: Features, rows: np.ndarray, model: SequentialRecommender, device: torch.device):
    if not model.cfg.align:
        return None, None
    assert feats.prefs is not None and feats.pref_mask is not None, "this model needs preference vectors"
    return (torch.from_numpy(feats.prefs[rows]).to(device), torch.from_numpy(feats.pref_mask[rows]).to(device))


def _user_batches(model: SequentialRecommender, feats: Features, stage: str, batch_size: int,
                  device: torch.device, keep: Callable[[np.ndarray], np.ndarray] | None = None,
                  users: np.ndarray | None = None):
    """Yield ``(rows, history [B, L], prefs, mask)`` over all split rows (or the sorted rows ``users``) in order, on
    ``device``; ``keep`` filters the rows of each batch (a batch left empty is skipped)."""
    order = np.arange(feats.split.num_users) if users is None else np.asarray(users)
    for start in range(0, order.size, batch_size):
        rows = order[start:start + batch_size]
        if keep is not None:
            rows = rows[keep(rows)]
            if not rows.size:
                continue
        hist = torch.from_numpy(feats.histories(rows, stage, model.cfg.max_len)).to(device)
        yield (rows, hist, *_prefs(feats, rows, model, device))


def train_epoch(model: SequentialRecommender, optimizer: torch.optim.Optimizer, feats: Features,
                row_batches: Iterable[np.ndarray], loss_type: str = "ce", device: torch.device | str = "cpu",
                module: torch.nn.Module | None = None, rng: np.random.Generator | None = None) -> float:
    """One pass over ``row_batches`` (arrays of split rows); returns the mean loss. ``module`` is what is called
    for the loss (a DDP wrapper of ``model`` under Ray Train), defaulting to ``model``; ``rng`` draws random
    windows of histories longer than ``max_len`` (see :meth:`Features.train_items`)."""
    device = torch.device(device)
    model.train()
    call = module or model
    total, n = 0.0, 0
    for rows in row_batches:
        items = torch.from_numpy(feats.train_items(rows, model.cfg.max_len, rng)).to(device)
        lens = (items > 0).sum(1).max().item()  # trim all-padding columns: sequences are left-padded
        items = items[:, items.shape[1] - max(int(lens), 2):]
        prefs, mask = _prefs(feats, rows, model, device)
        loss = call(items, prefs, mask, loss_type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(rows)
        n += len(rows)
    return total / max(n, 1)


def sampled_negatives(feats: Features, num: int = 100, seed: int = 0) -> np.ndarray:
    """[U, num] dense item indices each user never interacted with (any stage), uniform, fixed seed. Negatives
    may repeat within a user (as in the SASRec/LANE protocol). A user who has interacted with every item has no
    negative: its row is 0 (the padding index, scored -inf), so its target ranks first among itself alone; real
    catalogues do not have such users, tiny test data may."""
    split, N = feats.split, feats.num_items
    U = split.num_users
    user_of = np.repeat(np.arange(U), np.diff(split.offsets))
    seen = np.unique(user_of * (N + 1) + feats.index.encode(split.items))
    full = np.bincount(seen // (N + 1), minlength=U) >= N  # [U] users without any unseen item
    rng = np.random.default_rng(seed)
    out = rng.integers(1, N + 1, size=(U, num))
    out[full] = 0

    def clashes() -> np.ndarray:
        return np.isin(np.arange(U)[:, None] * (N + 1) + out, seen) & ~full[:, None]

    bad = clashes()
    while bad.any():  # re-draw only the clashes; converges fast unless a user saw almost everything
        out[bad] = rng.integers(1, N + 1, size=int(bad.sum()))
        bad = clashes()
    return out


@torch.no_grad()
def evaluate(model: SequentialRecommender, feats: Features, stage: str = "test",
             protocols: Iterable[Protocol] = PROTOCOLS, batch_size: int = 256, device: torch.device | str = "cpu",
             negatives: np.ndarray | None = None, seed: int = 0,
             users: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """NDCG/HR/MRR@5/10/20 over all users (or the split rows ``users``, see :func:`eval_rows`) for ``stage``.

    ``full``: every catalogue item is ranked, the history's items masked (the target itself never is);
    ``sampled100``: the target among 100 fixed-seed items the user never interacted with.
    """
    device = torch.device(device)
    protocols = tuple(protocols)
    if "sampled100" in protocols and negatives is None:
        negatives = sampled_negatives(feats, 100, seed)
    model.eval()
    targets_all = feats.index.encode(feats.split.targets(stage))  # type: ignore[arg-type]
    ranks: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
    for rows, hist, prefs, mask in _user_batches(model, feats, stage, batch_size, device, users=users):
        scores = model.full_scores(hist, prefs, mask)  # [B, N + 1]
        tgt = torch.from_numpy(targets_all[rows]).to(device)
        t_score = scores.gather(1, tgt[:, None]).squeeze(1)
        if "sampled100" in protocols:
            neg = torch.from_numpy(negatives[rows]).to(device)  # type: ignore[index]
            cand = scores.gather(1, neg)
            ranks["sampled100"].append(target_ranks(torch.cat([cand, t_score[:, None]], 1).cpu().numpy(),
                                                    t_score.cpu().numpy()))
        if "full" in protocols:
            _mask_seen_keep_target(scores, hist, tgt, t_score)
            ranks["full"].append(target_ranks(scores.cpu().numpy(), t_score.cpu().numpy()))
    return {p: rank_metrics(np.concatenate(r)) for p, r in ranks.items()}


def _mask_seen_keep_target(scores: torch.Tensor, hist: torch.Tensor, tgt: torch.Tensor, t_score: torch.Tensor) -> None:
    """The full-ranking protocol, in place on ``scores [B, N + 1]``: the history's items and the padding column
    score -inf, the target ``tgt [B]`` keeps its score ``t_score [B]`` even when it is in the history (repeat
    consumption)."""
    seen = hist.clone()
    seen[seen == tgt[:, None]] = 0
    scores.scatter_(1, seen, float("-inf"))
    scores[:, 0] = float("-inf")
    scores[torch.arange(len(tgt), device=scores.device), tgt] = t_score


# Rank bins of the hit-rate calibration (1-based, inclusive; None = the catalogue's last rank).
HIT_RATE_BINS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20),
                                                     (21, 50), (51, 100), (101, 500), (501, None))


@torch.no_grad()
def hit_rate_calibration(model: SequentialRecommender, feats: Features, stage: str = "valid", batch_size: int = 256,
                         device: torch.device | str = "cpu") -> dict[str, Any]:
    """How likely the item at rank r is the user's next one, measured on ``stage`` (validation by default, so
    the test split stays unseen): every user's ``stage`` target is ranked in the full ranking (seen items masked,
    as :func:`evaluate` does), the ranks are pooled into :data:`HIT_RATE_BINS`, and a bin's per-rank rate is its
    share of users over its width. Returns ``{"stage", "users", "items", "bins": [[lo, hi], ...],
    "counts": [...], "rates": [...]}`` (JSON-ready; the bins cover ranks 1..N: ``hi`` clipped to the catalogue,
    bins past it left out)."""
    device = torch.device(device)
    model.eval()
    N = feats.num_items
    targets_all = feats.index.encode(feats.split.targets(stage))  # type: ignore[arg-type]
    ranks = []
    for rows, hist, prefs, mask in _user_batches(model, feats, stage, batch_size, device):
        scores = model.full_scores(hist, prefs, mask)
        tgt = torch.from_numpy(targets_all[rows]).to(device)
        t_score = scores.gather(1, tgt[:, None]).squeeze(1)
        _mask_seen_keep_target(scores, hist, tgt, t_score)
        ranks.append(target_ranks(scores.cpu().numpy(), t_score.cpu().numpy()) + 1)
    r = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    bins, counts, rates = [], [], []
    for lo, hi in HIT_RATE_BINS:
        top = N if hi is None else min(hi, N)
        if top < lo:  # past a small catalogue
            continue
        n = int(((r >= lo) & (r <= top)).sum())
        bins.append([lo, top])
        counts.append(n)
        rates.append(n / r.size / (top - lo + 1) if r.size else 0.0)
    return {"stage": stage, "users": int(r.size), "items": N, "bins": bins, "counts": counts, "rates": rates}


def hit_rate_at(calibration: dict[str, Any], ranks: np.ndarray) -> np.ndarray:
    """[R] float32 calibrated hit rate of the 1-based ``ranks`` (0 past the calibrated catalogue)."""
    ranks = np.asarray(ranks)
    out = np.zeros(ranks.shape, dtype=np.float32)
    for (lo, hi), rate in zip(calibration["bins"], calibration["rates"], strict=True):
        out[(ranks >= lo) & (ranks <= hi)] = rate
    return out


@torch.no_grad()
def faithfulness(model: SequentialRecommender, feats: Features, stage: str = "test", batch_size: int = 256,
                 seed: int = 0, device: torch.device | str = "cpu", users: np.ndarray | None = None) -> dict[str, Any]:
    """Does the highest-weight preference matter most? Per user with >= 2 preferences: the target's score drop
    when the top-weight preference is removed (masked) versus when a random other present preference is; the
    share of users where the top-weight removal hurts more (ties count as not)."""
    if not model.cfg.align or feats.prefs is None or feats.pref_mask is None:
        raise ValueError("faithfulness needs a model with preference alignment and preference vectors")
    device = torch.device(device)
    model.eval()
    rng = np.random.default_rng(seed)
    targets_all = feats.index.encode(feats.split.targets(stage))  # type: ignore[arg-type]
    drops_top, drops_rand = [], []
    pref_mask = feats.pref_mask
    table = model.items.table()  # the same for every batch in eval mode
    for rows, hist, prefs, mask in _user_batches(model, feats, stage, batch_size, device,
                                                 keep=lambda r: pref_mask[r].sum(1) >= 2, users=users):
        cand = torch.from_numpy(targets_all[rows]).to(device)[:, None]
        rep, w = model.user_vectors(hist, prefs, mask, table)
        base = (table[cand[:, 0]] * rep).sum(-1)
        w = w.masked_fill(~mask, -1.0)
        top = w.argmax(1)
        # a random present preference other than the top one
        choice = np.array([rng.choice(np.flatnonzero(mk & (np.arange(mk.size) != t)))
                           for mk, t in zip(feats.pref_mask[rows], top.cpu().numpy(), strict=True)])
        rand = torch.from_numpy(choice).to(device)
        ar = torch.arange(len(rows), device=device)
        drop = {}
        for name, idx in (("top", top), ("rand", rand)):
            m2 = mask.clone()
            m2[ar, idx] = False
            rep2, _ = model.user_vectors(hist, prefs, m2, table)
            drop[name] = (base - (table[cand[:, 0]] * rep2).sum(-1)).cpu().numpy()
        drops_top.append(drop["top"])
        drops_rand.append(drop["rand"])
    dt = np.concatenate(drops_top) if drops_top else np.zeros(0)
    dr = np.concatenate(drops_rand) if drops_rand else np.zeros(0)
    return {"users": int(dt.size), "top_hurts_more": float((dt > dr).mean()) if dt.size else None,
            "mean_drop_top": float(dt.mean()) if dt.size else None,
            "mean_drop_random": float(dr.mean()) if dr.size else None}


class TrainingRun:
    """The epochs of one training run, the same code in this process (:func:`fit`) and in a Ray Train worker
    (``lane_ray.pipeline.train``): a worker's rows in a permutation drawn from ``(seed, epoch, rank)``, history
    windows drawn from another stream of the same key, validation NDCG@10 on rank 0 with early stopping, and
    ``state`` (what a checkpoint holds besides the weights, the optimizer and the torch RNG). One Ray Train worker
    has every row in order, so it trains on the same batches with the same draws as :func:`fit`. The caller seeds
    torch before building the model, so both paths start from the same weights."""

    def __init__(self, model: SequentialRecommender, feats: Features, s: FitSettings,
                 device: torch.device | str = "cpu", rank: int = 0, module: torch.nn.Module | None = None) -> None:
        self.model, self.feats, self.s, self.rank = model, feats, s, rank
        self.device = torch.device(device)
        self.module = module or model  # what the loss is called on: a DDP wrapper under Ray Train
        self.optimizer = make_optimizer(model, s.lr, s.weight_decay)
        self.negatives = sampled_negatives(feats, 100, s.seed) if rank == 0 else None
        self.users = eval_rows(feats.split.num_users, s.eval_users)
        self.state: dict[str, Any] = {"epoch": 0, "best_ndcg": -1.0, "best_epoch": -1, "best_valid": None,
                                      "curve": []}
        self.best_weights: dict[str, torch.Tensor] | None = None

    def batches(self, rows: np.ndarray, epoch: int) -> Iterator[np.ndarray]:
        """``rows`` (this worker's split rows) in batches, shuffled by ``(seed, epoch, rank)``: the same batches in
        every run and after a restart."""
        rows = rows[np.random.default_rng([self.s.seed, epoch, self.rank, 2]).permutation(rows.size)]
        return (rows[i:i + self.s.batch_size] for i in range(0, rows.size, self.s.batch_size))

    def train(self, rows: np.ndarray, epoch: int,
              wrap: Callable[[Iterator[np.ndarray]], Iterable[np.ndarray]] | None = None) -> dict[str, Any]:
        """One epoch over ``rows``; its curve record (``epoch``, ``loss``, ``epoch_seconds``). ``wrap`` sees the
        batches on their way (fault injection)."""
        t0 = time.perf_counter()
        # dropout draws from torch's RNG seeded by (seed, epoch, rank): every worker of a run restarted after a
        # failure draws the masks of the run never disturbed, not only the one whose RNG a checkpoint could hold
        torch.manual_seed(int(np.random.default_rng([self.s.seed, epoch, self.rank, 3]).integers(2**62)))
        batches = self.batches(rows, epoch)
        loss = train_epoch(self.model, self.optimizer, self.feats, wrap(batches) if wrap else batches, self.s.loss,
                           self.device, module=self.module,
                           rng=np.random.default_rng([self.s.seed, epoch, self.rank, 1]))
        return {"epoch": epoch, "loss": loss, "epoch_seconds": time.perf_counter() - t0}

    def validate(self, rec: dict[str, Any]) -> bool:
        """Rank 0 after an epoch: validation metrics into ``rec``, the best weights kept, the curve extended;
        whether to stop (``patience`` epochs without a better validation NDCG@10)."""
        t0 = time.perf_counter()
        v = evaluate(self.model, self.feats, "valid", ("full", "sampled100"), self.s.eval_batch_size, self.device,
                     self.negatives, users=self.users)
        rec["valid"] = v
        rec["eval_seconds"] = time.perf_counter() - t0
        epoch = rec["epoch"]
        if v["full"]["ndcg@10"] > self.state["best_ndcg"]:
            self.state.update(best_ndcg=v["full"]["ndcg@10"], best_epoch=epoch, best_valid=v)
            self.best_weights = {k: t.detach().cpu().clone() for k, t in self.model.state_dict().items()}
        self.state["curve"].append(rec)
        self.state["epoch"] = epoch + 1
        return epoch - self.state["best_epoch"] >= self.s.patience or epoch + 1 >= self.s.epochs


def fit(model: SequentialRecommender, feats: Features, s: FitSettings, device: torch.device | str = "cpu",
        on_epoch: Callable[[dict[str, Any], SequentialRecommender], None] | None = None) -> dict[str, Any]:
    """Train in this process with early stopping on validation NDCG@10 (full ranking), by :class:`TrainingRun` as
    one Ray Train worker does; keeps the best weights in ``model``. Seed torch before building ``model``.

    Returns ``{"curve": [...per-epoch dicts...], "best_epoch", "best_valid", "epochs", "train_seconds"}``."""
    model.to(torch.device(device))
    run = TrainingRun(model, feats, s, device)
    rows = np.arange(feats.split.num_users)
    t0 = time.perf_counter()
    for epoch in range(s.epochs):
        rec = run.train(rows, epoch)
        stop = run.validate(rec)
        if on_epoch is not None:
            on_epoch(rec, model)
        if stop:
            break
    if run.best_weights is not None:
        model.load_state_dict(run.best_weights)
    st = run.state
    return {"curve": st["curve"], "best_epoch": st["best_epoch"], "best_valid": st["best_valid"],
            "epochs": len(st["curve"]), "train_seconds": time.perf_counter() - t0}


Pick = Callable[[torch.Tensor, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def _top_k(k: int) -> Pick:
    """The top ``k`` of the masked full scores, ranks 1..k."""

    def pick(scores: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        top = scores.topk(min(k, scores.shape[1] - 1), dim=1)
        ranks = torch.arange(1, top.indices.shape[1] + 1, device=scores.device).expand_as(top.indices)
        return top.indices, ranks

    return pick


def _low_ranked(per_user: int, min_rank: int, seed: int, num_items: int) -> Pick:
    """``per_user`` distinct random unseen items ranked below ``min_rank`` (lower half in small catalogues)."""
    rng = np.random.default_rng(seed)

    def pick(scores: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = scores.argsort(dim=1, descending=True)  # [B, N + 1]; -inf (seen, padding) last
        unseen = torch.isfinite(scores).sum(1).cpu().numpy()
        B = len(rows)
        pos = np.zeros((B, per_user), dtype=np.int64)
        ok = np.zeros((B, per_user), dtype=bool)
        for b in range(B):
            lo = min_rank if num_items >= 2 * min_rank else int(unseen[b]) // 2
            n = int(unseen[b]) - lo
            if n <= 0:
                continue
            take = min(per_user, n)
            pos[b, :take] = np.sort(rng.choice(n, size=take, replace=False)) + lo
            ok[b, :take] = True
        pos_t = torch.from_numpy(pos).to(scores.device)
        ranks = torch.where(torch.from_numpy(ok).to(scores.device), pos_t + 1, 0)
        return order.gather(1, pos_t), ranks

    return pick


@torch.no_grad()
def recommend(model: SequentialRecommender, feats: Features, k: int = 10, stage: str = "test",
              batch_size: int = 256, device: torch.device | str = "cpu", attribution: bool = True,
              history_top: int = 3, history_window: int = 50) -> dict[str, np.ndarray]:
    """Top-``k`` items per user after the ``stage`` history (its items masked), with scores and, for aligned
    models, the alignment weights over the user's preferences. Arrays of ``U * k`` rows: ``user_id``,
    ``item_id``, ``rank`` (1-based), ``score``, ``preference_weights`` ``[U * k, m]`` (or ``None``); with
    ``attribution`` also the item-level attribution of each row (:func:`lane_ray.models.attribute`):
    ``pref_contrib [U * k, m]``, ``pref_share [U * k]``, ``history_index [U * k, h]`` (dense, 0 = none) and
    ``history_contrib [U * k, h]`` (else these are ``None``). A user with fewer than ``k`` unseen items has -inf
    scores in the surplus rows."""
    return _ranked_rows(model, feats, [_top_k(k)], stage, batch_size, device, attribution, history_top,
                        history_window)[0]


@torch.no_grad()
def negative_controls(model: SequentialRecommender, feats: Features, per_user: int = 3, min_rank: int = 500,
                      seed: int = 0, stage: str = "test", batch_size: int = 256, device: torch.device | str = "cpu",
                      attribution: bool = True, history_top: int = 3,
                      history_window: int = 50) -> dict[str, np.ndarray]:
    """Items the model ranks low, as controls for explanation checks: per user ``per_user`` distinct random
    unseen items whose full-ranking rank (history masked, as in :func:`recommend`) is worse than ``min_rank``; in
    catalogues under ``2 * min_rank`` items, from the lower half of the user's unseen items instead. Fixed seed.
    The arrays of :func:`recommend`, ``rank`` being the item's true rank; a user with fewer eligible items gets
    fewer rows."""
    return recommend_with_controls(model, feats, 0, per_user, min_rank, seed, stage, batch_size, device,
                                   attribution, history_top, history_window)[1]


@torch.no_grad()
def recommend_with_controls(model: SequentialRecommender, feats: Features, k: int = 10, per_user: int = 3,
                            min_rank: int = 500, seed: int = 0, stage: str = "test", batch_size: int = 256,
                            device: torch.device | str = "cpu", attribution: bool = True, history_top: int = 3,
                            history_window: int = 50) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`recommend` and :func:`negative_controls` in one pass: the history removals of the attribution
    depend on the user only, so both item sets share them (half the cost of two calls)."""
    picks = [_top_k(k), _low_ranked(per_user, min_rank, seed, feats.num_items)]
    top, low = _ranked_rows(model, feats, picks, stage, batch_size, device, attribution, history_top,
                            history_window)
    keep = low["rank"] > 0
    return top, {key: (v[keep] if v is not None else None) for key, v in low.items()}


_ROW_KEYS = ("user", "item", "rank", "score", "weights", "pref_contrib", "pref_share", "history_index",
             "history_contrib")


def _ranked_rows(model: SequentialRecommender, feats: Features, picks: list[Pick], stage: str, batch_size: int,
                 device: torch.device | str, attribution: bool, history_top: int,
                 history_window: int) -> list[dict[str, np.ndarray]]:
    """For each ``pick(masked full scores [B, N + 1], split rows) -> (items [B, K], ranks [B, K])``: the rows of
    the items it chooses per user, with their scores, alignment weights and (``attribution``) attributions, all
    picks attributed in one call per batch."""
    from lane_ray.models.attribution import attribute

    device = torch.device(device)
    model.eval()
    parts: list[dict[str, list[np.ndarray]]] = [{key: [] for key in _ROW_KEYS} for _ in picks]
    table = model.items.table()  # the same for every batch in eval mode
    for rows, hist, prefs, mask in _user_batches(model, feats, stage, batch_size, device):
        rep, w = model.user_vectors(hist, prefs, mask, table)
        scores = rep @ table.T
        scores[:, 0] = float("-inf")
        scores.scatter_(1, hist, float("-inf"))
        chosen = [pick(scores, rows) for pick in picks]
        widths = [idx.shape[1] for idx, _ in chosen]
        att = None
        if attribution and sum(widths):
            att = attribute(model, hist, torch.cat([idx for idx, _ in chosen], 1), prefs, mask, table, history_top,
                            history_window)
        start = 0
        for part, (idx, ranks), kk in zip(parts, chosen, widths, strict=True):
            cols = slice(start, start + kk)
            start += kk
            part["user"].append(np.repeat(rows, kk))
            part["item"].append(idx.cpu().numpy().ravel())
            part["rank"].append(ranks.cpu().numpy().ravel())
            part["score"].append(scores.gather(1, idx).cpu().numpy().ravel())
            if w is not None:
                part["weights"].append(np.repeat(w.cpu().numpy(), kk, 0))
            if att is not None:
                n = len(rows) * kk
                part["pref_contrib"].append(att.pref_contrib[:, cols].reshape(n, -1).cpu().numpy())
                part["pref_share"].append(att.pref_share[:, cols].cpu().numpy().ravel())
                part["history_index"].append(att.history_idx[:, cols].reshape(n, -1).cpu().numpy())
                part["history_contrib"].append(att.history_contrib[:, cols].reshape(n, -1).cpu().numpy())
    return [_rows_out(part, feats) for part in parts]


def _rows_out(part: dict[str, list[np.ndarray]], feats: Features) -> dict[str, np.ndarray]:
    def cat(key: str, empty: np.ndarray | None = None) -> np.ndarray | None:
        return np.concatenate(part[key]) if part[key] else empty

    user_rows = cat("user", np.zeros(0, np.int64))
    idx = cat("item", np.zeros(0, np.int64))
    return {"user_id": feats.split.user_ids[user_rows], "item_id": feats.index.decode(idx) if idx.size else idx,
            "rank": cat("rank", np.zeros(0, np.int64)).astype(np.int64),  # type: ignore[union-attr]
            "score": cat("score", np.zeros(0)).astype(np.float64),  # type: ignore[union-attr]
            "preference_weights": cat("weights"), "pref_contrib": cat("pref_contrib"),
            "pref_share": cat("pref_share"), "history_index": cat("history_index"),
            "history_contrib": cat("history_contrib")}
