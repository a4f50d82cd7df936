"""Preprocessing: title normalisation, duplicate handling, k-core filter, ordering and statistics.

Every row removed is counted by reason in :attr:`PreparedDataset.report`, so nothing is lost silently.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lane_ray.config import DataConfig
from lane_ray.data.loaders import RawDataset

_TAG_RE = re.compile(r"<[^>]+>")
_WS_RE = re.compile(r"\s+")
# MovieLens writes "Shawshank Redemption, The"; put the article back in front.
_ARTICLE_RE = re.compile(r"^(.+?), (The|A|An|Les|La|Le|L'|Il|Das|Der|Die|El|Los|Las)$")
_TITLE_FIELD = pa.field("title", pa.string(), nullable=False)
_PLACEHOLDERS = {"", "nan", "none", "null", "n/a"}


def normalize_title(title: str | None) -> str:
    """Canonical form of a title: NFC, HTML entities and tags removed, whitespace collapsed, article first."""
    if title is None:
        return ""
    t = unicodedata.normalize("NFC", title)
    if "&" in t:
        t = html.unescape(t)
    if "<" in t:
        t = _TAG_RE.sub(" ", t)
    t = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in t)
    t = _WS_RE.sub(" ", t).strip()
    m = _ARTICLE_RE.match(t)
    if m:
        t = f"{m.group(2)} {m.group(1)}" if not m.group(2).endswith("'") else f"{m.group(2)}{m.group(1)}"
    return "" if t.lower() in _PLACEHOLDERS else t


@dataclass
class PreparedDataset:
    """Canonical tables after preprocessing, sorted by (user_id, timestamp, original order)."""

    interactions: pa.Table
    catalog: pa.Table
    name: str
    report: dict[str, Any] = field(default_factory=dict)  # counts of what was removed or changed
    user_ids: pa.Table | None = None

    def stats(self) -> dict[str, Any]:
        """Dataset statistics: sizes, density and sequence-length distribution."""
        return dataset_stats(self.interactions, self.catalog)


def dataset_stats(interactions: pa.Table, catalog: pa.Table) -> dict[str, Any]:
    users = interactions["user_id"].to_numpy()
    items = interactions["item_id"].to_numpy()
    n_users = int(np.unique(users).size)
    n_items = int(np.unique(items).size)
    lengths = np.unique(users, return_counts=True)[1] if users.size else np.zeros(1, dtype=np.int64)
    item_counts = np.unique(items, return_counts=True)[1] if items.size else np.zeros(1, dtype=np.int64)
    n = int(interactions.num_rows)
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "catalog_items": int(catalog.num_rows),
        "density": round(n / max(n_users * n_items, 1), 6),
        "seq_len": {
            "min": int(lengths.min()),
            "max": int(lengths.max()),
            "mean": round(float(lengths.mean()), 3),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
        },
        "item_interactions": {
            "min": int(item_counts.min()),
            "max": int(item_counts.max()),
            "mean": round(float(item_counts.mean()), 3),
        },
    }


def kcore(users: np.ndarray, items: np.ndarray, user_k: int, item_k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core: a boolean mask of kept rows (every kept user has >= user_k rows and every kept
    item >= item_k rows), and the number of rounds it took."""
    keep = np.ones(users.shape[0], dtype=bool)
    if user_k <= 1 and item_k <= 1:
        return keep, 0
    rounds = 0
    while True:
        rounds += 1
        changed = False
        for col, k in ((users, user_k), (items, item_k)):
            if k <= 1:
                continue
            vals = col[keep]
            uniq, inv, counts = np.unique(vals, return_inverse=True, return_counts=True)
            bad = counts[inv] < k
            if bad.any():
                idx = np.flatnonzero(keep)
                keep[idx[bad]] = False
                changed = True
        if not changed:
            return keep, rounds


def _count_true(mask: pa.Array | pa.ChunkedArray) -> int:
    """True values of a boolean mask (0 for an empty one, where Arrow's sum is null)."""
    return int(pc.sum(mask).as_py() or 0)


def prepare(raw: RawDataset, cfg: DataConfig, default_kcore: tuple[int, int] = (0, 0)) -> PreparedDataset:
    """Turn a :class:`RawDataset` into the canonical, filtered, ordered tables (see module docstring)."""
    report: dict[str, Any] = {f"raw_{k}": v for k, v in raw.dropped.items()}
    report["raw_interactions"] = int(raw.interactions.num_rows)
    report["raw_catalog_items"] = int(raw.catalog.num_rows)

    # --- catalogue: duplicate ids, title normalisation, empty titles --------------------------------
    cat = raw.catalog
    ids = cat["item_id"].to_numpy()
    _, first = np.unique(ids, return_index=True)
    report["catalog_duplicate_ids"] = int(ids.size - first.size)  # later rows of a repeated id are dropped
    if first.size != ids.size:
        cat = cat.take(pa.array(np.sort(first)))
    titles = cat["title"].to_pylist()
    if cfg.normalize_titles:
        new = [normalize_title(t) for t in titles]
        report["titles_normalized"] = int(sum(a != b for a, b in zip(titles, new, strict=True)))
    else:
        new = ["" if t is None else t.strip() for t in titles]
    empty = np.array([t == "" for t in new], dtype=bool)
    report["empty_titles"] = int(empty.sum())
    if cfg.empty_titles == "placeholder":
        new = [f"item {i}" if e else t for t, e, i in zip(new, empty, cat["item_id"].to_pylist(), strict=True)]
        cat = cat.set_column(cat.schema.get_field_index("title"), _TITLE_FIELD, pa.array(new, pa.string()))
    else:
        cat = cat.set_column(cat.schema.get_field_index("title"), _TITLE_FIELD, pa.array(new, pa.string()))
        cat = cat.filter(pa.array(~empty))
    report["empty_titles_action"] = cfg.empty_titles
    uniq_titles = pc.unique(cat["title"])
    report["duplicate_titles"] = int(cat.num_rows - len(uniq_titles))  # kept: distinct items may share a title

    # --- interactions ---------------------------------------------------------------------------------
    inter = raw.interactions.append_column("_row", pa.array(np.arange(raw.interactions.num_rows), pa.int64()))
    known = pc.is_in(inter["item_id"], value_set=cat["item_id"])
    report["interactions_unknown_item"] = inter.num_rows - _count_true(known)
    inter = inter.filter(known)
    if cfg.min_rating is not None:
        if "rating" not in inter.column_names:
            report["interactions_below_min_rating"] = 0
        else:
            ok = pc.fill_null(pc.greater_equal(inter["rating"], cfg.min_rating), False)
            report["interactions_below_min_rating"] = inter.num_rows - _count_true(ok)
            inter = inter.filter(ok)
    # exact duplicates (same user, item and time) are one event logged twice
    u = inter["user_id"].to_numpy()
    it = inter["item_id"].to_numpy()
    ts = inter["timestamp"].to_numpy()
    order = np.lexsort((inter["_row"].to_numpy(), ts, it, u))
    su, si, st = u[order], it[order], ts[order]
    dup = np.zeros(order.size, dtype=bool)
    if order.size > 1:
        dup[1:] = (su[1:] == su[:-1]) & (si[1:] == si[:-1]) & (st[1:] == st[:-1])
    report["duplicate_interactions"] = int(dup.sum())
    if dup.any():
        inter = inter.take(pa.array(np.sort(order[~dup])))

    if cfg.max_users is not None:
        users_sorted = np.unique(inter["user_id"].to_numpy())
        cap = users_sorted[: cfg.max_users]
        mask = np.isin(inter["user_id"].to_numpy(), cap)
        report["users_over_cap"] = int(users_sorted.size - cap.size)
        report["interactions_over_cap"] = int((~mask).sum())
        inter = inter.filter(pa.array(mask))

    # --- k-core, then the leave-one-out minimum -------------------------------------------------------
    user_k = cfg.user_k_core if cfg.user_k_core is not None else default_kcore[0]
    item_k = cfg.item_k_core if cfg.item_k_core is not None else default_kcore[1]
    report["user_k_core"], report["item_k_core"] = user_k, item_k
    u, it = inter["user_id"].to_numpy(), inter["item_id"].to_numpy()
    keep, rounds = kcore(u, it, max(user_k, 0), max(item_k, 0))
    report["kcore_rounds"] = rounds
    report["interactions_removed_by_kcore"] = int((~keep).sum())
    inter = inter.filter(pa.array(keep))
    u = inter["user_id"].to_numpy()
    uniq, inv, counts = np.unique(u, return_inverse=True, return_counts=True)
    short = counts[inv] < cfg.min_user_interactions
    report["users_too_short"] = int((counts < cfg.min_user_interactions).sum())
    report["interactions_of_short_users"] = int(short.sum())
    inter = inter.filter(pa.array(~short))

    # --- order: user, time, then file order (stable tie-break) ----------------------------------------
    order = np.lexsort((inter["_row"].to_numpy(), inter["timestamp"].to_numpy(), inter["user_id"].to_numpy()))
    inter = inter.take(pa.array(order)).drop_columns(["_row"])

    used = pc.is_in(cat["item_id"], value_set=pc.unique(inter["item_id"]))
    report["catalog_items_without_interactions"] = cat.num_rows - _count_true(used)
    if not cfg.keep_cold_items:
        cat = cat.filter(used)
    cat = cat.take(pc.sort_indices(cat, [("item_id", "ascending")]))

    user_ids = raw.user_ids
    if user_ids is not None:
        user_ids = user_ids.filter(pc.is_in(user_ids["user_id"], value_set=pc.unique(inter["user_id"])))
    if inter.num_rows == 0:
        from lane_ray.errors import DataError

        raise DataError(f"no interactions left after preprocessing ({_removed_summary(report)})",
                        file=raw.files[0] if raw.files else raw.name)
    return PreparedDataset(inter, cat, name=raw.name, report=report, user_ids=user_ids)


def _removed_summary(report: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in report.items() if isinstance(v, int) and v and k != "raw_interactions")
