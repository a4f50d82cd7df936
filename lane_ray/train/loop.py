"""Pure epoch functions: training, evaluation under both protocols, faithfulness. No Ray; the Ray Train loop
(``lane_ray.pipeline.train``) and the in-process experiments call the same functions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
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
    eval_every: int = 1
    eval_batch_size: int = 256
    seed: int = 0
    eval_users: int | None = None  # evaluate on this fixed sample of users (eval_rows); None = all


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
            seen = hist.clone()
            seen[seen == tgt[:, None]] = 0  # never mask the target (repeat consumption)
            scores.scatter_(1, seen, float("-inf"))
            scores[:, 0] = float("-inf")
            scores[torch.arange(len(rows)), tgt] = t_score
            ranks["full"].append(target_ranks(scores.cpu().numpy(), t_score.cpu().numpy()))
    return {p: rank_metrics(np.concatenate(r)) for p, r in ranks.items()}


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


def epoch_rows(num_users: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled batches of split rows for one epoch (the seed and epoch fix the order)."""
    rows = np.random.default_rng([seed, epoch]).permutation(num_users)
    return [rows[i:i + batch_size] for i in range(0, num_users, batch_size)]


def fit(model: SequentialRecommender, feats: Features, s: FitSettings, device: torch.device | str = "cpu",
        on_epoch: Callable[[dict[str, Any], SequentialRecommender], None] | None = None) -> dict[str, Any]:
    """Train with early stopping on validation NDCG@10 (full ranking); keeps the best weights in ``model``.

    Returns ``{"curve": [...per-epoch dicts...], "best_epoch", "best_valid", "epochs", "train_seconds"}``."""
    device = torch.device(device)
    torch.manual_seed(s.seed)
    model.to(device)
    optimizer = make_optimizer(model, s.lr, s.weight_decay)
    negatives = sampled_negatives(feats, 100, s.seed)
    users = eval_rows(feats.split.num_users, s.eval_users)
    best: dict[str, Any] = {"ndcg": -1.0, "epoch": -1, "state": None, "valid": None}
    curve: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    epoch = 0
    for epoch in range(s.epochs):
        te = time.perf_counter()
        loss = train_epoch(model, optimizer, feats, epoch_rows(feats.split.num_users, s.batch_size, s.seed, epoch),
                           s.loss, device, rng=np.random.default_rng([s.seed, epoch, 1]))
        rec: dict[str, Any] = {"epoch": epoch, "loss": loss, "epoch_seconds": time.perf_counter() - te}
        if (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs:
            v = evaluate(model, feats, "valid", ("full", "sampled100"), s.eval_batch_size, device, negatives,
                         users=users)
            rec["valid"] = v
            if v["full"]["ndcg@10"] > best["ndcg"]:
                best = {"ndcg": v["full"]["ndcg@10"], "epoch": epoch, "valid": v,
                        "state": {k: t.detach().clone() for k, t in model.state_dict().items()}}
        curve.append(rec)
        if on_epoch is not None:
            on_epoch(rec, model)
        if epoch - best["epoch"] >= s.patience * s.eval_every:
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"curve": curve, "best_epoch": best["epoch"], "best_valid": best["valid"], "epochs": epoch + 1,
            "train_seconds": time.perf_counter() - t0}


@torch.no_grad()
def recommend(model: SequentialRecommender, feats: Features, k: int = 10, stage: str = "test",
              batch_size: int = 256, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Top-``k`` items per user after the ``stage`` history (its items masked), with scores and, for aligned
    models, the alignment weights over the user's preferences. Arrays of ``U * k`` rows: ``user_id``,
    ``item_id``, ``rank`` (1-based), ``score``, ``preference_weights`` ``[U * k, m]`` (or ``None``)."""
    device = torch.device(device)
    model.eval()
    U = feats.split.num_users
    items, scores_out, weights_out = [], [], []
    table = model.items.table()  # the same for every batch in eval mode
    for _, hist, prefs, mask in _user_batches(model, feats, stage, batch_size, device):
        rep, w = model.user_vectors(hist, prefs, mask, table)
        scores = rep @ table.T
        scores[:, 0] = float("-inf")
        scores.scatter_(1, hist, float("-inf"))
        top = scores.topk(min(k, feats.num_items), dim=1)
        items.append(top.indices.cpu().numpy())
        scores_out.append(top.values.cpu().numpy())
        if w is not None:
            weights_out.append(np.repeat(w.cpu().numpy()[:, None, :], top.indices.shape[1], 1))
    idx = np.concatenate(items)
    kk = idx.shape[1]
    return {"user_id": np.repeat(feats.split.user_ids, kk), "item_id": feats.index.decode(idx.ravel()),
            "rank": np.tile(np.arange(1, kk + 1), U), "score": np.concatenate(scores_out).ravel().astype(np.float64),
            "preference_weights": np.concatenate(weights_out).reshape(U * kk, -1) if weights_out else None}
