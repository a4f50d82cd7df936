"""Dataset loaders: raw files in their native layouts -> canonical ``interactions`` and ``catalog`` tables.

Every loader returns a :class:`RawDataset` whose tables follow the schemas of docs/design.md (ids int64, timestamps
Unix seconds). Nothing is filtered here beyond what a format makes unusable (and that is counted in
``RawDataset.dropped``); preprocessing (``lane_ray.data.preprocess``) does the rest.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lane_ray.config import DataConfig, DatasetFormat
from lane_ray.data.schemas import catalog_table, interactions_table
from lane_ray.data.textio import DelimitedTable, check_nonempty, iter_records, to_int64, to_timestamp
from lane_ray.errors import DataError
from lane_ray.io import read_parquet

# The 19 genre flags of ml-100k's u.item, in file order (u.genre holds the same list).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_YEAR_RE = re.compile(r"^(.*?)\s*\((\d{4})(?:[-–]\d{0,4})?\)\s*$")


@dataclass
class RawDataset:
    """A dataset in canonical tables before preprocessing."""

    interactions: pa.Table
    catalog: pa.Table
    name: str
    files: list[Path]
    user_ids: pa.Table | None = None  # user_id -> source_id, when user ids were mapped
    dropped: dict[str, int] = field(default_factory=dict)  # rows a format made unusable, by reason


def map_ids(values: pa.Array, start: int = 1) -> tuple[pa.Array, pa.Array]:
    """Dense int64 ids (from ``start``, in order of first appearance) for arbitrary id values.

    Returns ``(ids, source)`` where ``source[k]`` is the original value of id ``start + k``, as a string.
    """
    values = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
    uniq = pc.unique(values)
    idx = pc.index_in(values, value_set=uniq)
    ids = pc.add(idx.cast(pa.int64()), start)
    return ids, uniq


def _ids(values: pa.Array, *, file: Path, field: str, line_of, mapped: bool) -> tuple[pa.Array, pa.Array | None]:
    """Integer ids, or (when ``mapped``) dense ids plus their source values."""
    if mapped:
        if values.null_count:
            raise DataError("missing id", file=file, field=field)
        return map_ids(values)
    try:
        return to_int64(values, file=file, field=field, line_of=line_of), None
    except DataError as exc:
        if exc.problem.startswith("not an integer"):
            raise DataError(exc.problem + " (ids must be integers; set data.map_ids=true to map string ids)",
                            file=exc.file, field=exc.field, row=exc.row) from None
        raise


def split_title_year(titles: list[str | None]) -> tuple[list[str], list[str | None]]:
    """Split MovieLens titles such as 'Toy Story (1995)' into ('Toy Story', '1995')."""
    out_t: list[str] = []
    out_y: list[str | None] = []
    for t in titles:
        t = (t or "").strip()
        m = _YEAR_RE.match(t)
        if m and m.group(1):
            out_t.append(m.group(1))
            out_y.append(m.group(2))
        else:
            out_t.append(t)
            out_y.append(None)
    return out_t, out_y


# --------------------------------------------------------------------------------------------------
# MovieLens raw (ml-100k, ml-1m, ml-10m/20m/25m/latest)
# --------------------------------------------------------------------------------------------------


def load_movielens(root: Path, cfg: DataConfig) -> RawDataset:
    """Load a MovieLens directory in its raw layout, detected from the files it holds."""
    if (root / "u.data").exists() or (root / "u.item").exists():
        return _load_ml100k(root)
    if (root / "ratings.dat").exists() or (root / "movies.dat").exists():
        return _load_ml1m(root)
    if (root / "ratings.csv").exists() or (root / "movies.csv").exists():
        return _load_ml_csv(root)
    raise DataError(
        "not a MovieLens directory: expected u.data + u.item (ml-100k), ratings.dat + movies.dat (ml-1m) "
        "or ratings.csv + movies.csv (ml-20m/25m)", file=root,
    )


def _ml_interactions(t: DelimitedTable, user: str, item: str, rating: str, ts: str) -> pa.Table:
    return interactions_table(
        _ids(t.column(user), file=t.path, field=user, line_of=t.line_of, mapped=False)[0],
        _ids(t.column(item), file=t.path, field=item, line_of=t.line_of, mapped=False)[0],
        to_timestamp(t.column(ts), file=t.path, field=ts, line_of=t.line_of),
        t.floats(rating),
    )


def _load_ml100k(root: Path) -> RawDataset:
    data_f, item_f = root / "u.data", root / "u.item"
    check_nonempty(data_f)
    check_nonempty(item_f)
    t = DelimitedTable(data_f, delimiter="\t", column_names=["user_id", "item_id", "rating", "timestamp"],
                       quoting=False)
    inter = _ml_interactions(t, "user_id", "item_id", "rating", "timestamp")
    genre_names = list(ML100K_GENRES)
    genre_f = root / "u.genre"
    if genre_f.exists() and genre_f.stat().st_size:
        listed = [ln.split("|")[0] for ln in genre_f.read_text(encoding="latin-1").splitlines() if "|" in ln]
        if len(listed) == len(ML100K_GENRES):
            genre_names = listed
    cols = ["item_id", "title", "release_date", "video_release_date", "url"] + [f"g{i}" for i in
                                                                               range(len(genre_names))]
    it = DelimitedTable(item_f, delimiter="|", column_names=cols, encoding="latin-1", quoting=False)
    ids = _ids(it.column("item_id"), file=item_f, field="item_id", line_of=it.line_of, mapped=False)[0]
    titles, years = split_title_year(it.strings("title").to_pylist())
    flags = np.stack([np.asarray(it.strings(f"g{i}").to_pylist()) == "1" for i in range(len(genre_names))], 1)
    genres = ["|".join(g for g, on in zip(genre_names, row, strict=True) if on) for row in flags]
    dates = it.strings("release_date").to_pylist()
    years = [y or (d[-4:] if d and d[-4:].isdigit() else None) for y, d in zip(years, dates, strict=True)]
    catalog = catalog_table(ids, pa.array(titles), genres=pa.array(genres), year=pa.array(years, pa.string()))
    return RawDataset(inter, catalog, name=root.name, files=[data_f, item_f])


def _load_ml1m(root: Path) -> RawDataset:
    rf, mf = root / "ratings.dat", root / "movies.dat"
    t = DelimitedTable(rf, delimiter="\x1f", multichar_delimiter="::", quoting=False,
                       column_names=["user_id", "item_id", "rating", "timestamp"])
    inter = _ml_interactions(t, "user_id", "item_id", "rating", "timestamp")
    m = DelimitedTable(mf, delimiter="\x1f", multichar_delimiter="::", quoting=False, encoding="latin-1",
                       column_names=["item_id", "title", "genres"])
    return _ml_catalog(m, inter, root, [rf, mf])


def _load_ml_csv(root: Path) -> RawDataset:
    rf, mf = root / "ratings.csv", root / "movies.csv"
    t = DelimitedTable(rf, delimiter=",")
    t.require("userId", "movieId", "rating", "timestamp")
    inter = _ml_interactions(t, "userId", "movieId", "rating", "timestamp")
    m = DelimitedTable(mf, delimiter=",")
    m.require("movieId", "title", "genres")
    m.table = m.table.rename_columns(["item_id" if c == "movieId" else c for c in m.table.column_names])
    return _ml_catalog(m, inter, root, [rf, mf])


def _ml_catalog(m: DelimitedTable, inter: pa.Table, root: Path, files: list[Path]) -> RawDataset:
    ids = _ids(m.column("item_id"), file=m.path, field="item_id", line_of=m.line_of, mapped=False)[0]
    titles, years = split_title_year(m.strings("title").to_pylist())
    genres = [None if g in ("", "(no genres listed)") else g for g in m.strings("genres").to_pylist()]
    catalog = catalog_table(ids, pa.array(titles), genres=pa.array(genres, pa.string()),
                            year=pa.array(years, pa.string()))
    return RawDataset(inter, catalog, name=root.name, files=files)


# --------------------------------------------------------------------------------------------------
# RecBole atomic files
# --------------------------------------------------------------------------------------------------

_RECBOLE_TYPES = {"token", "token_seq", "float", "float_seq"}


def _recbole_table(path: Path) -> tuple[DelimitedTable, dict[str, str]]:
    t = DelimitedTable(path, delimiter="\t", quoting=False)
    fields: dict[str, str] = {}
    renamed = []
    for col in t.table.column_names:
        name, _, ftype = col.partition(":")
        if ftype not in _RECBOLE_TYPES:
            raise DataError(f"header field '{col}' is not of the form name:type with type in "
                            f"{sorted(_RECBOLE_TYPES)}", file=path, row=1, field=col)
        fields[name] = ftype
        renamed.append(name)
    t.table = t.table.rename_columns(renamed)
    return t, fields


def load_recbole(root: Path, cfg: DataConfig) -> RawDataset:
    """Load RecBole atomic files: the directory holding ``<name>.inter`` and ``<name>.item``."""
    if root.is_file():
        root = root.parent
    inters = sorted(root.glob("*.inter"))
    if not inters:
        raise DataError("no <name>.inter file in this directory (RecBole atomic format)", file=root)
    inter_f = inters[0]
    item_f = inter_f.with_suffix(".item")
    if not item_f.exists():
        raise DataError(f"missing {item_f.name}: LANE needs item titles from the .item file", file=root)
    t, _ = _recbole_table(inter_f)
    for f in ("user_id", "item_id", "timestamp"):
        t.require(f)
    users, user_src = _ids(t.column("user_id"), file=inter_f, field="user_id", line_of=t.line_of,
                           mapped=cfg.map_ids)
    it, ifields = _recbole_table(item_f)
    it.require("item_id")
    title_field = cfg.title_field or next((f for f in ifields if "title" in f.lower()), None)
    if title_field is None:
        raise DataError(f"no title field (found: {', '.join(ifields)}); set data.title_field", file=item_f,
                        field="title")
    it.require(title_field)
    if cfg.map_ids:
        # Items are mapped once over the catalogue, then the interactions are looked up in it.
        cat_ids, item_src = map_ids(it.strings("item_id"))
        lookup = pc.index_in(t.strings("item_id"), value_set=item_src)
        unknown = lookup.null_count
        keep = pc.is_valid(lookup)
        items = pc.add(pc.drop_null(lookup).cast(pa.int64()), 1)
        users, ts_col = pc.filter(users, keep), pc.filter(t.strings("timestamp"), keep)
        rating = pc.filter(t.strings("rating"), keep) if "rating" in ifields or "rating" in t.table.column_names \
            else None
    else:
        cat_ids = _ids(it.column("item_id"), file=item_f, field="item_id", line_of=it.line_of, mapped=False)[0]
        items = _ids(t.column("item_id"), file=inter_f, field="item_id", line_of=t.line_of, mapped=False)[0]
        item_src, unknown = None, 0
        ts_col = t.strings("timestamp")
        rating = t.strings("rating") if "rating" in t.table.column_names else None
    ts = to_timestamp(ts_col, file=inter_f, field="timestamp", line_of=t.line_of)
    rating_arr = None
    if rating is not None:
        from lane_ray.data.textio import to_float64

        rating_arr = to_float64(rating, file=inter_f, field="rating", line_of=t.line_of)
    inter = interactions_table(users, items, ts, rating_arr)
    text: dict[str, pa.Array | None] = {}
    genre_field = next((f for f in ("genre", "genres", "class", "categories", "category") if f in ifields), None)
    if genre_field:
        raw = it.strings(genre_field)
        sep = "|" if any("|" in (g or "") for g in raw.to_pylist()[:1000]) else " "
        text["genres"] = pc.replace_substring(pc.utf8_trim_whitespace(raw), sep, "|") if sep != "|" else raw
    year_field = next((f for f in ("release_year", "year") if f in ifields), None)
    if year_field:
        years = it.strings(year_field)
        text["year"] = pc.if_else(pc.match_substring_regex(years, r"^\d{4}$"), years, pa.scalar(None, pa.string()))
    if item_src is not None:
        text["source_id"] = item_src
    catalog = catalog_table(cat_ids, it.strings(title_field), **text)
    user_ids = None
    if user_src is not None:
        user_ids = pa.table({"user_id": pa.array(np.arange(1, len(user_src) + 1), pa.int64()),
                             "source_id": user_src})
    dropped = {"interactions_unknown_item": unknown} if unknown else {}
    return RawDataset(inter, catalog, name=inter_f.stem, files=[inter_f, item_f], user_ids=user_ids,
                      dropped=dropped)


# --------------------------------------------------------------------------------------------------
# JSON-lines datasets: Amazon reviews (2014 and 2018 layouts) and Steam (Kang & McAuley)
# --------------------------------------------------------------------------------------------------


def _json_files(root: Path, meta_pattern: str) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in root.iterdir() if p.is_file() and re.search(r"\.json(l)?(\.gz)?$", p.name))
    meta = [p for p in files if re.search(meta_pattern, p.name)]
    return [p for p in files if p not in meta], meta


def _build_from_records(
    reviews: list[tuple[str, str, int, float | None]],
    items: dict[str, tuple[str, str | None]],
    name: str,
    files: list[Path],
    dropped: dict[str, int],
) -> RawDataset:
    """Canonical tables from (user, item, ts, rating) tuples and item -> (title, genres)."""
    if not reviews:
        raise DataError("no interactions found", file=files[0])
    users = pa.array([r[0] for r in reviews], pa.string())
    item_keys = pa.array([r[1] for r in reviews], pa.string())
    uid, usrc = map_ids(users)
    cat_keys = pa.array(list(items.keys()), pa.string())
    lookup = pc.index_in(item_keys, value_set=cat_keys)
    unknown = lookup.null_count
    if unknown:
        dropped["interactions_unknown_item"] = dropped.get("interactions_unknown_item", 0) + unknown
    keep = pc.is_valid(lookup)
    inter = interactions_table(
        pc.filter(uid, keep),
        pc.add(pc.drop_null(lookup).cast(pa.int64()), 1),
        pc.filter(pa.array([r[2] for r in reviews], pa.int64()), keep),
        pc.filter(pa.array([r[3] for r in reviews], pa.float64()), keep),
    )
    vals = list(items.values())
    catalog = catalog_table(
        pa.array(np.arange(1, len(items) + 1), pa.int64()),
        pa.array([v[0] for v in vals], pa.string()),
        genres=pa.array([v[1] for v in vals], pa.string()),
        source_id=cat_keys,
    )
    user_ids = pa.table({"user_id": pa.array(np.arange(1, len(usrc) + 1), pa.int64()), "source_id": usrc})
    return RawDataset(inter, catalog, name=name, files=files, user_ids=user_ids, dropped=dropped)


def _need(rec: dict, key: str, path: Path, lineno: int):
    if key not in rec or rec[key] is None:
        raise DataError("missing field", file=path, row=lineno, field=key)
    return rec[key]


def load_amazon(root: Path, cfg: DataConfig) -> RawDataset:
    """Amazon reviews: a review file and a ``meta_*`` file (2014 or 2018 layout, ``.json`` or ``.json.gz``)."""
    review_files, meta_files = _json_files(root, r"^meta_")
    if not review_files:
        raise DataError("no review file (*.json or *.json.gz) besides the meta_ file", file=root)
    if not meta_files:
        raise DataError("no metadata file (meta_*.json or meta_*.json.gz): titles come from it", file=root)
    reviews: list[tuple[str, str, int, float | None]] = []
    for f in review_files:
        for lineno, rec in iter_records(f):
            user = _need(rec, "reviewerID", f, lineno)
            item = _need(rec, "asin", f, lineno)
            ts = rec.get("unixReviewTime")
            if ts is None:
                raise DataError("missing field", file=f, row=lineno, field="unixReviewTime")
            try:
                ts = int(ts)
            except (TypeError, ValueError):
                raise DataError(f"not an integer: {ts!r}", file=f, row=lineno, field="unixReviewTime") from None
            rating = rec.get("overall")
            try:
                rating = float(rating) if rating is not None else None
            except (TypeError, ValueError):
                raise DataError(f"not a number: {rating!r}", file=f, row=lineno, field="overall") from None
            reviews.append((str(user), str(item), ts, rating))
    items: dict[str, tuple[str, str | None]] = {}
    dropped: dict[str, int] = {}
    for f in meta_files:
        for lineno, rec in iter_records(f):
            asin = str(_need(rec, "asin", f, lineno))
            title = rec.get("title")
            cats = rec.get("categories") or rec.get("category")  # 2014: list of lists; 2018: list
            if cats and isinstance(cats[0], list):
                cats = cats[0]
            genres = "|".join(str(c) for c in cats) if cats else None
            if asin in items:
                dropped["catalog_duplicate_ids"] = dropped.get("catalog_duplicate_ids", 0) + 1
                continue
            items[asin] = (str(title) if title is not None else "", genres)
    return _build_from_records(reviews, items, root.name, review_files + meta_files, dropped)


def load_steam(root: Path, cfg: DataConfig) -> RawDataset:
    """Steam (Kang & McAuley 2018): ``steam_reviews.json[.gz]`` and ``steam_games.json[.gz]``."""
    review_files, meta_files = _json_files(root, r"games")
    if not review_files:
        raise DataError("no review file (steam_reviews.json[.gz])", file=root)
    if not meta_files:
        raise DataError("no games file (steam_games.json[.gz]): titles come from it", file=root)
    reviews: list[tuple[str, str, int, float | None]] = []
    for f in review_files:
        for lineno, rec in iter_records(f):
            user = rec.get("user_id") or rec.get("username")
            if user is None:
                raise DataError("missing field", file=f, row=lineno, field="username")
            item = _need(rec, "product_id", f, lineno)
            date = _need(rec, "date", f, lineno)
            try:
                ts = int(dt.datetime.strptime(str(date), "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp())
            except ValueError:
                raise DataError(f"not a date (YYYY-MM-DD): {date!r}", file=f, row=lineno, field="date") from None
            reviews.append((str(user), str(item), ts, None))
    items: dict[str, tuple[str, str | None]] = {}
    dropped: dict[str, int] = {}
    for f in meta_files:
        for _, rec in iter_records(f):
            gid = rec.get("id")
            if gid is None:  # a few entries of the public dump have no id: nothing can refer to them
                dropped["catalog_rows_without_id"] = dropped.get("catalog_rows_without_id", 0) + 1
                continue
            title = rec.get("title") or rec.get("app_name") or ""
            genres = rec.get("genres") or rec.get("tags")
            if str(gid) in items:
                dropped["catalog_duplicate_ids"] = dropped.get("catalog_duplicate_ids", 0) + 1
                continue
            items[str(gid)] = (str(title), "|".join(map(str, genres)) if genres else None)
    return _build_from_records(reviews, items, root.name, review_files + meta_files, dropped)


# --------------------------------------------------------------------------------------------------
# Generic CSV / Parquet with a column mapping
# --------------------------------------------------------------------------------------------------


def _find_table_file(root: Path, stem: str, fmt: str) -> Path | None:
    exts = (".csv", ".csv.gz", ".tsv") if fmt == "csv" else (".parquet",)
    for base in (root, root / "data"):
        for ext in exts:
            p = base / f"{stem}{ext}"
            if p.exists():
                return p
    return None


class _Columns:
    """Columns of a CSV or Parquet file, with the same conversion and error interface."""

    def __init__(self, path: Path, fmt: str, cfg: DataConfig) -> None:
        self.path = path
        if fmt == "csv":
            delim = "\t" if path.suffix == ".tsv" else cfg.csv_delimiter
            self._csv: DelimitedTable | None = DelimitedTable(path, delimiter=delim)
            self.table = self._csv.table
            self.line_of = self._csv.line_of
        else:
            self._csv = None
            self.table = read_parquet(path)
            if self.table.num_rows == 0:
                raise DataError("file has no rows", file=path)
            self.line_of = lambda i: i + 1  # Parquet rows are reported 1-based, no header

    def has(self, name: str | None) -> bool:
        return name is not None and name in self.table.column_names

    def get(self, name: str) -> pa.Array:
        if name not in self.table.column_names:
            raise DataError(f"missing column (found: {', '.join(self.table.column_names)})", file=self.path,
                            field=name)
        return self.table[name].combine_chunks()


def load_tabular(path: Path, cfg: DataConfig, fmt: str) -> RawDataset:
    """Generic CSV/Parquet: a directory with ``interactions`` and ``catalog`` files, or one interactions
    file (with ``data.catalog`` or a title column in it). Columns are named by ``data.columns``."""
    cm = cfg.columns
    if path.is_dir():
        inter_f = _find_table_file(path, "interactions", fmt)
        if inter_f is None:
            raise DataError(f"no interactions.{'csv' if fmt == 'csv' else 'parquet'} here (or under data/)",
                            file=path)
        cat_f = Path(cfg.catalog) if cfg.catalog else _find_table_file(path, "catalog", fmt)
    else:
        inter_f = path
        cat_f = Path(cfg.catalog) if cfg.catalog else None
    inter = _Columns(inter_f, fmt if inter_f.suffix != ".parquet" else "parquet", cfg)
    if cat_f is not None:
        cat = _Columns(cat_f, "parquet" if cat_f.suffix == ".parquet" else "csv", cfg)
    elif inter.has(cm.title):
        cat = inter
    else:
        raise DataError(f"no catalogue: give data.catalog, put catalog.{fmt} beside it, or add a "
                        f"'{cm.title}' column", file=inter_f, field=cm.title)
    users, user_src = _ids(inter.get(cm.user_id), file=inter_f, field=cm.user_id, line_of=inter.line_of,
                           mapped=cfg.map_ids)
    raw_items = inter.get(cm.item_id)
    ts = to_timestamp(inter.get(cm.timestamp), file=inter_f, field=cm.timestamp, line_of=inter.line_of)
    rating = None
    if inter.has(cm.rating):
        from lane_ray.data.textio import to_float64

        rating = to_float64(inter.get(cm.rating), file=inter_f, field=cm.rating, line_of=inter.line_of)
    cat_raw_ids = cat.get(cm.item_id)
    titles = cat.get(cm.title)
    dropped: dict[str, int] = {}
    text: dict[str, pa.Array | None] = {}
    if cfg.map_ids:
        cat_ids, src = map_ids(cat_raw_ids)
        lookup = pc.index_in(raw_items.cast(pa.string()), value_set=src)
        if lookup.null_count:
            dropped["interactions_unknown_item"] = lookup.null_count
        keep = pc.is_valid(lookup)
        items = pc.add(pc.drop_null(lookup).cast(pa.int64()), 1)
        users, ts = pc.filter(users, keep), pc.filter(ts, keep)
        rating = pc.filter(rating, keep) if rating is not None else None
        text["source_id"] = src
    else:
        cat_ids = _ids(cat_raw_ids, file=cat.path, field=cm.item_id, line_of=cat.line_of, mapped=False)[0]
        items = _ids(raw_items, file=inter_f, field=cm.item_id, line_of=inter.line_of, mapped=False)[0]
    for col in cm.text_columns:
        if cat.has(col):
            text[col] = cat.get(col).cast(pa.string())
    if titles.null_count:
        titles = pc.fill_null(titles.cast(pa.string()), "")
    catalog = catalog_table(cat_ids, titles, **text)
    if cat is inter:  # catalogue derived from an interactions file: one row per item
        catalog = _first_per_item(catalog)
    user_ids = None
    if user_src is not None:
        user_ids = pa.table({"user_id": pa.array(np.arange(1, len(user_src) + 1), pa.int64()),
                             "source_id": user_src})
    files = [inter_f] + ([cat_f] if cat_f is not None else [])
    return RawDataset(interactions_table(users, items, ts, rating), catalog, name=path.stem, files=files,
                      user_ids=user_ids, dropped=dropped)


def _first_per_item(catalog: pa.Table) -> pa.Table:
    ids = catalog["item_id"].to_numpy()
    _, first = np.unique(ids, return_index=True)
    return catalog.take(pa.array(np.sort(first)))


LOADERS = {
    "movielens": load_movielens,
    "recbole": load_recbole,
    "amazon": load_amazon,
    "steam": load_steam,
}


def detect_format(path: Path) -> DatasetFormat:
    """Guess a dataset's format from the files at ``path``; raise naming what was expected."""
    if path.is_file():
        name = path.name
        if name.endswith(".parquet"):
            return "parquet"
        if re.search(r"\.(csv|tsv)(\.gz)?$", name):
            return "csv"
        if name.endswith((".inter", ".item")):
            return "recbole"
        raise DataError("cannot tell the format of this file; pass --format", file=path)
    names = {p.name for p in path.iterdir()} | {f"data/{p.name}" for p in (path / "data").glob("*")}
    if names & {"u.data", "u.item", "ratings.dat", "movies.dat", "ratings.csv", "movies.csv"}:
        return "movielens"
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    if any(n.startswith("meta_") for n in names):
        return "amazon"
    if any("steam" in n for n in names):
        return "steam"
    if any(n.split("/")[-1].startswith("interactions.parquet") for n in names):
        return "parquet"
    if any(re.match(r"(data/)?interactions\.(csv|tsv)", n) for n in names):
        return "csv"
    raise DataError("cannot tell the dataset format from the files here; pass --format "
                    "movielens|recbole|amazon|steam|csv|parquet", file=path)


def load_path(path: Path, cfg: DataConfig, fmt: DatasetFormat | None = None) -> RawDataset:
    """Load the dataset at ``path`` in format ``fmt`` (detected when None)."""
    if not path.exists():
        raise DataError("dataset path not found", file=path, field="dataset")
    fmt = fmt or detect_format(path)
    if fmt in ("csv", "parquet"):
        return load_tabular(path, cfg, fmt)
    if path.is_file() and fmt != "recbole":
        raise DataError(f"the {fmt} format is read from a directory, got a file", file=path)
    return LOADERS[fmt](path, cfg)
