"""Every loader on small files written here: well-formed input gives canonical tables; malformed input
gives a one-line DataError naming file, row and field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lane_ray.config import ColumnMap, DataConfig
from lane_ray.data import load_dataset, load_raw
from lane_ray.data.loaders import detect_format, split_title_year
from lane_ray.errors import DataError
from tests.conftest import amazon_records, write


def canonical(raw) -> None:
    s = raw.interactions.schema
    assert [s.field(c).type for c in ("user_id", "item_id", "timestamp")] == [pa.int64()] * 3
    assert raw.catalog.schema.field("item_id").type == pa.int64()
    assert raw.catalog.schema.field("title").type == pa.string()


def cfg(path, **kw) -> DataConfig:
    return DataConfig(dataset=str(path), **kw)


# ---------------------------------------------------------------------------------------- well-formed


def test_movielens_100k_raw(ml100k_dir):
    raw, _ = load_raw(cfg(ml100k_dir))
    canonical(raw)
    assert raw.interactions.num_rows == 10
    cat = {r["item_id"]: r for r in raw.catalog.to_pylist()}
    assert cat[1]["title"] == "Toy Story" and cat[1]["year"] == "1995"
    assert cat[1]["genres"] == "Animation|Children's|Comedy"
    assert cat[3]["title"] == "Amélie"  # latin-1 decoded
    assert raw.interactions.column("rating").to_pylist()[:2] == [5.0, 3.0]
    prepared = load_dataset(cfg(ml100k_dir))
    titles = dict(zip(prepared.catalog["item_id"].to_pylist(), prepared.catalog["title"].to_pylist(), strict=True))
    assert titles[2] == "The Shawshank Redemption"  # article moved to the front


def test_movielens_1m_dat(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "ratings.dat", "1::10::5::978300760\n1::20::3::978302109\n1::30::3::978301968\n")
    write(d / "movies.dat", "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Heat (1995)::Action\n"
          "30::Se7en: Director's Cut (1995)::Thriller\n".encode("latin-1"))
    raw, _ = load_raw(cfg(d))
    canonical(raw)
    assert raw.interactions["timestamp"].to_pylist() == [978300760, 978302109, 978301968]
    assert raw.catalog["title"].to_pylist() == ["Toy Story", "Heat", "Se7en: Director's Cut"]


def test_movielens_25m_csv(tmp_path):
    d = tmp_path / "ml-25m"
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,944249077\n1,2,3.5,944250228\n"
          "1,3,5.0,943230976\n")
    write(d / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
          '2,"American President, The (1995)",Comedy|Drama\n3,Untitled,(no genres listed)\n')
    raw, _ = load_raw(cfg(d))
    canonical(raw)
    rows = raw.catalog.to_pylist()
    assert rows[1]["title"] == "American President, The" and rows[1]["year"] == "1995"
    assert rows[2]["genres"] is None and rows[2]["year"] is None


def test_recbole_atomic(recbole_dir):
    raw, _ = load_raw(cfg(recbole_dir, format="recbole"))
    canonical(raw)
    assert raw.interactions.num_rows == 7
    cat = {r["item_id"]: r for r in raw.catalog.to_pylist()}
    assert cat[10]["genres"] == "Crime|Thriller"
    assert cat[13]["year"] is None  # 'unknown' is not a year
    assert detect_format(recbole_dir) == "recbole"


def test_recbole_string_tokens_need_map_ids(tmp_path):
    d = tmp_path / "rb"
    write(d / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\nu1\ti2\t2\nu1\ti3\t3\n")
    write(d / "x.item", "item_id:token\ttitle:token_seq\ni1\tOne\ni2\tTwo\ni3\tThree\n")
    with pytest.raises(DataError, match=r"x.inter: row 2: field 'user_id': not an integer: 'u1'.*map_ids"):
        load_raw(cfg(d))
    raw, _ = load_raw(cfg(d, map_ids=True))
    assert raw.interactions["item_id"].to_pylist() == [1, 2, 3]
    assert raw.catalog["source_id"].to_pylist() == ["i1", "i2", "i3"]
    assert raw.user_ids["source_id"].to_pylist() == ["u1"]


@pytest.mark.parametrize("layout", [2014, 2018])
def test_amazon_layouts(tmp_path, layout):
    d = tmp_path / f"amazon{layout}"
    rev, meta = amazon_records(layout)
    write(d / "reviews_Beauty_5.json.gz", rev)
    write(d / "meta_Beauty.json.gz" if layout == 2014 else d / "meta_All_Beauty.json", meta)
    raw, _ = load_raw(cfg(d))
    canonical(raw)
    assert raw.dropped == {"interactions_unknown_item": 1}  # B09 has no metadata: counted, not hidden
    assert raw.interactions.num_rows == 6
    assert raw.catalog["source_id"].to_pylist() == ["B01", "B02", "B03"]
    assert raw.catalog["genres"].to_pylist()[2] == "Beauty|Skin Care"
    prepared = load_dataset(cfg(d))
    assert prepared.report["raw_interactions_unknown_item"] == 1
    if layout == 2014:
        assert prepared.catalog["title"].to_pylist()[0] == "Rose & Oud Perfume"  # HTML entity decoded


def test_steam(tmp_path):
    d = tmp_path / "steam"
    reviews = [{"username": "bob", "product_id": "10", "date": "2017-12-17", "text": "fun"},
               {"username": "bob", "product_id": "20", "date": "2017-12-18"},
               {"username": "bob", "product_id": "30", "date": "2017-12-19"},
               {"username": "amy", "user_id": "7656", "product_id": "10", "date": "2016-01-01"}]
    write(d / "steam_reviews.json.gz", "".join(repr(r) + "\n" for r in reviews))
    games = [{"id": "10", "app_name": "Portal", "title": "Portal", "genres": ["Puzzle"]},
             {"id": "20", "app_name": "Dota 2", "tags": ["MOBA"]},
             {"id": "30", "title": "Half-Life"}, {"app_name": "No id here"}]
    write(d / "steam_games.json.gz", "".join(repr(g) + "\n" for g in games))
    raw, _ = load_raw(cfg(d))
    canonical(raw)
    assert raw.dropped["catalog_rows_without_id"] == 1
    assert raw.catalog["title"].to_pylist() == ["Portal", "Dota 2", "Half-Life"]
    assert raw.interactions["timestamp"].to_pylist()[0] == 1513468800  # 2017-12-17 UTC
    assert sorted(raw.user_ids["source_id"].to_pylist()) == ["7656", "bob"]


def test_generic_csv_with_column_mapping_and_iso_time(tmp_path):
    d = tmp_path / "shop"
    write(d / "interactions.csv", "uid;sku;when\n5;100;2021-01-01T10:00:00\n5;101;2021-01-02 10:00:00\n"
          "5;102;2021-01-03\n")
    write(d / "catalog.csv", "sku;name;genres\n100;Red Shoes;Shoes\n101;Blue Hat;Hats\n102;Green Scarf;\n")
    c = cfg(d, format="csv", csv_delimiter=";",
            columns=ColumnMap(user_id="uid", item_id="sku", timestamp="when", title="name"))
    raw, _ = load_raw(c)
    canonical(raw)
    assert raw.interactions["timestamp"].to_pylist() == [1609495200, 1609581600, 1609632000]
    assert raw.catalog["title"].to_pylist() == ["Red Shoes", "Blue Hat", "Green Scarf"]


def test_generic_parquet_single_file_with_titles(tmp_path):
    t = pa.table({"user_id": [1, 1, 1, 2], "item_id": [7, 8, 9, 7], "timestamp": [1, 2, 3, 4],
                  "title": ["Seven", "Eight", "Nine", "Seven"]})
    f = tmp_path / "log.parquet"
    pq.write_table(t, f)
    raw, _ = load_raw(cfg(f))
    canonical(raw)
    assert raw.catalog["item_id"].to_pylist() == [7, 8, 9]  # one catalogue row per item
    assert "rating" not in raw.interactions.column_names


def test_title_year_split():
    assert split_title_year(["Heat (1995)", "Babe", "Les Misérables (1995-1996)", None]) == (
        ["Heat", "Babe", "Les Misérables", ""], ["1995", None, "1995", None])


# ------------------------------------------------------------------------------------------ malformed


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_column(tmp_path):
    d = tmp_path / "ml"
    write(d / "ratings.csv", "userId,movieId,rating\n1,1,4\n")
    write(d / "movies.csv", "movieId,title,genres\n1,A (1990),Drama\n")
    with pytest.raises(DataError) as exc:
        load_raw(cfg(d))
    msg = one_line(exc)
    assert "ratings.csv" in msg and "field 'timestamp'" in msg and "missing column" in msg


def test_non_numeric_id(ml100k_dir):
    data = (ml100k_dir / "u.data").read_text().splitlines()
    data[3] = "2\tabc\t4\t100"
    (ml100k_dir / "u.data").write_text("\n".join(data) + "\n")
    with pytest.raises(DataError) as exc:
        load_raw(cfg(ml100k_dir))
    msg = one_line(exc)
    assert "u.data: row 4: field 'item_id': not an integer: 'abc'" in msg


def test_non_numeric_id_in_generic_csv(tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp,title\n1,1,1,A\nx7,2,2,B\n")
    with pytest.raises(DataError) as exc:
        load_raw(cfg(tmp_path / "interactions.csv"))
    assert "interactions.csv: row 3: field 'user_id': not an integer: 'x7'" in one_line(exc)


def test_undecodable_bytes(recbole_dir):
    item = recbole_dir / "toy.item"
    item.write_bytes(item.read_bytes().replace(b"Heat", b"He\xff\xfet"))
    with pytest.raises(DataError) as exc:
        load_raw(cfg(recbole_dir))
    msg = one_line(exc)
    assert "toy.item: row 3: field 'movie_title:token_seq': undecodable bytes" in msg


def test_undecodable_bytes_in_json_lines(tmp_path):
    d = tmp_path / "amz"
    rev, meta = amazon_records(2018)
    write(d / "reviews.json", rev.encode() + b'{"reviewerID": "\xff"}\n')
    write(d / "meta_x.json", meta)
    with pytest.raises(DataError) as exc:
        load_raw(cfg(d))
    assert "reviews.json: row 8: undecodable bytes" in one_line(exc)


@pytest.mark.parametrize("which", ["u.data", "u.item"])
def test_empty_file(ml100k_dir, which):
    (ml100k_dir / which).write_bytes(b"")
    with pytest.raises(DataError) as exc:
        load_raw(cfg(ml100k_dir))
    assert f"{which}: file is empty" in one_line(exc)


def test_truncated_parquet(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "timestamp": [1, 2, 3]}),
                   d / "interactions.parquet")
    pq.write_table(pa.table({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}), d / "catalog.parquet")
    blob = (d / "catalog.parquet").read_bytes()
    (d / "catalog.parquet").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as exc:
        load_raw(cfg(d))
    msg = one_line(exc)
    assert "catalog.parquet" in msg and "truncated or corrupt" in msg


def test_unknown_dataset_name():
    with pytest.raises(DataError) as exc:
        load_raw(DataConfig(dataset="ml-999k"))
    msg = one_line(exc)
    assert "field 'dataset'" in msg and "unknown dataset 'ml-999k'" in msg and "ml-100k" in msg


def test_wrong_field_count_names_the_row(ml100k_dir):
    (ml100k_dir / "u.data").write_text("1\t1\t5\t100\n1\t2\t3\n")
    with pytest.raises(DataError) as exc:
        load_raw(cfg(ml100k_dir))
    assert "u.data: row 2: expected 4 fields" in one_line(exc)


def test_bad_json_line_and_missing_field(tmp_path):
    d = tmp_path / "amz"
    rev, meta = amazon_records(2018)
    write(d / "reviews.json", rev + "{not json\n")
    write(d / "meta_x.json", meta)
    with pytest.raises(DataError, match=r"reviews.json: row 8: not a JSON object"):
        load_raw(cfg(d))
    write(d / "reviews.json", rev + json.dumps({"reviewerID": "A9", "unixReviewTime": 5}) + "\n")
    with pytest.raises(DataError, match=r"reviews.json: row 8: field 'asin': missing field"):
        load_raw(cfg(d))


def test_bad_timestamp(tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp,title\n1,1,5,A\n1,2,yesterday,B\n")
    with pytest.raises(DataError, match=r"row 3: field 'timestamp': not a timestamp"):
        load_raw(cfg(tmp_path / "interactions.csv"))


def test_missing_path_and_undetectable_format(tmp_path):
    with pytest.raises(DataError, match="field 'dataset': dataset path not found"):
        load_raw(cfg(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    write(tmp_path / "junk" / "readme.txt", "hi")
    with pytest.raises(DataError, match="pass --format"):
        load_raw(cfg(tmp_path / "junk"))


def test_recbole_bad_header(recbole_dir):
    (recbole_dir / "toy.inter").write_text("user_id\titem_id:token\ttimestamp:float\n1\t10\t1\n")
    with pytest.raises(DataError, match=r"toy.inter: row 1: field 'user_id': header field"):
        load_raw(cfg(recbole_dir))


def test_readers_accept_parquet_directories(tmp_path):
    d = tmp_path / "parts" / "interactions.parquet"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1, 2]}), d / "part-0.parquet")
    pq.write_table(pa.table({"user_id": [1], "item_id": [3], "timestamp": [3]}), d / "part-1.parquet")
    pq.write_table(pa.table({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}), tmp_path / "parts" / "catalog.parquet")
    raw, _ = load_raw(cfg(tmp_path / "parts"))
    assert raw.interactions.num_rows == 3


def _unused(p: Path) -> None:  # keep Path imported for type hints in fixtures
    return None
