"""Property-based bad input (hypothesis) for every dataset loader and for the config loader: whatever the bytes, a
load either succeeds with every removed row counted, or fails with a one-line LaneError naming the file (and the
field where there is one); never another exception, never a silent loss."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lane_ray.config import ColumnMap, DataConfig, load_config
from lane_ray.data import load_dataset
from lane_ray.errors import ConfigError, LaneError
from tests.conftest import ML100K_DATA, ML100K_ITEM, amazon_records, write

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _steam() -> dict[str, bytes]:
    reviews = [{"username": "bob", "product_id": "10", "date": "2017-12-17"},
               {"username": "bob", "product_id": "20", "date": "2017-12-18"},
               {"username": "bob", "product_id": "30", "date": "2017-12-19"}]
    games = [{"id": "10", "app_name": "Portal", "genres": ["Puzzle"]}, {"id": "20", "app_name": "Dota 2"},
             {"id": "30", "title": "Half-Life"}]
    return {"steam_reviews.json": "".join(repr(r) + "\n" for r in reviews).encode(),
            "steam_games.json": "".join(repr(g) + "\n" for g in games).encode()}


# name -> (files of a well-formed dataset, DataConfig keyword arguments)
DATASETS: dict[str, tuple[dict[str, bytes], dict]] = {
    "ml-100k": ({"u.data": ML100K_DATA.encode(), "u.item": ML100K_ITEM.encode("latin-1")}, {}),
    "ml-1m": ({"ratings.dat": b"1::10::5::978300760\n1::20::3::978302109\n1::30::3::978301968\n",
               "movies.dat": b"10::Toy Story (1995)::Animation\n20::Heat (1995)::Action\n30::Se7en (1995)::Thriller\n"},
              {}),
    "recbole": ({"toy.inter": b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                               b"1\t10\t4\t1\n1\t11\t4\t2\n1\t12\t4\t3\n2\t12\t4\t1\n2\t10\t4\t2\n2\t11\t4\t3\n",
                 "toy.item": b"item_id:token\tmovie_title:token_seq\tclass:token_seq\n10\tHeat\tAction\n"
                             b"11\tCasino\tDrama\n12\tBabe\tComedy\n"}, {}),
    "amazon": ({"reviews_Beauty_5.json": amazon_records(2018)[0].encode(),
                "meta_Beauty.json": amazon_records(2018)[1].encode()}, {"format": "amazon"}),
    "steam": (_steam(), {"format": "steam"}),
    "csv": ({"interactions.csv": b"uid;sku;when\n5;100;2021-01-01T10:00:00\n5;101;2021-01-02\n5;102;2021-01-03\n",
             "catalog.csv": b"sku;name\n100;Red Shoes\n101;Blue Hat\n102;Green Scarf\n"},
            {"format": "csv", "csv_delimiter": ";",
             "columns": ColumnMap(user_id="uid", item_id="sku", timestamp="when", title="name")}),
    "parquet": ({"interactions.parquet": _parquet_bytes(pa.table({"user_id": [1, 1, 1], "item_id": [7, 8, 9],
                                                                  "timestamp": [1, 2, 3]})),
                 "catalog.parquet": _parquet_bytes(pa.table({"item_id": [7, 8, 9], "title": ["a", "b", "c"]}))},
                {"format": "parquet"}),
}

REMOVALS = ("interactions_unknown_item", "interactions_below_min_rating", "duplicate_interactions",
            "interactions_over_cap", "interactions_removed_by_kcore", "interactions_of_short_users")


@st.composite
def mutation(draw):
    """One corruption of one file: truncate, insert bytes, replace/duplicate/delete a line, or empty it."""
    kind = draw(st.sampled_from(["truncate", "insert", "replace_line", "duplicate_line", "delete_line", "empty",
                                 "swap_field"]))
    return kind, draw(st.integers(0, 10_000)), draw(st.binary(min_size=1, max_size=12)), draw(st.text(max_size=30))


def mutate(data: bytes, m) -> bytes:
    kind, pos, junk, text = m
    lines = data.split(b"\n")
    at = pos % max(1, len(lines))
    if kind == "truncate":
        return data[: pos % max(1, len(data))]
    if kind == "insert":
        i = pos % max(1, len(data))
        return data[:i] + junk + data[i:]
    if kind == "replace_line":
        lines[at] = text.encode("utf-8", "surrogatepass")
    elif kind == "duplicate_line":
        lines.insert(at, lines[at])
    elif kind == "delete_line":
        lines.pop(at)
    elif kind == "empty":
        return b""
    elif kind == "swap_field":  # a numeric field replaced by the text (ids, ratings, times)
        for sep in (b"\t", b"::", b";", b","):
            if sep in lines[at]:
                fields = lines[at].split(sep)
                fields[pos % len(fields)] = text.encode("utf-8", "surrogatepass")
                lines[at] = sep.join(fields)
                break
    return b"\n".join(lines)


def _check_outcome(folder: Path, kw: dict) -> None:
    try:
        prepared = load_dataset(DataConfig(dataset=str(folder), **kw))
    except LaneError as exc:
        msg = str(exc)
        assert "\n" not in msg.strip(), msg  # one line
        assert str(folder) in msg or any(p.name in msg for p in folder.iterdir()), msg  # names the file
        return
    r = prepared.report
    kept = prepared.interactions.num_rows
    assert kept == r["raw_interactions"] - sum(r.get(k, 0) for k in REMOVALS), r  # every removed row counted
    assert prepared.catalog["item_id"].is_unique if hasattr(prepared.catalog["item_id"], "is_unique") else True
    ids = prepared.catalog["item_id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert set(prepared.interactions["item_id"].to_pylist()) <= set(ids)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_well_formed_base_loads(name, tmp_path):
    files, kw = DATASETS[name]
    for fname, data in files.items():
        write(tmp_path / fname, data)
    prepared = load_dataset(DataConfig(dataset=str(tmp_path), **kw))
    assert prepared.interactions.num_rows > 0


@pytest.mark.parametrize("name", sorted(DATASETS))
@FUZZ
@given(which=st.integers(0, 1), m=mutation())
def test_corrupted_files_load_or_fail_naming_the_file(name, which, m):
    files, kw = DATASETS[name]
    target = sorted(files)[which % len(files)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        for fname, data in files.items():
            write(folder / fname, mutate(data, m) if fname == target else data)
        _check_outcome(folder, kw)


# ------------------------------------------------------------------------------------------------ config

SECTIONS = ["run", "data", "synth", "ray", "embed", "llm", "preferences", "explain", "train", "serve"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
field_names = st.sampled_from(["out", "seed", "dataset", "format", "max_users", "num_cpus", "batch_size", "model",
                               "backend", "temperature", "epochs", "lr", "variant", "port", "m", "bogus", "columns"])


@FUZZ
@given(doc=st.one_of(values, st.dictionaries(st.sampled_from(SECTIONS + ["nope"]),
                                             st.one_of(values, st.dictionaries(field_names, values, max_size=4)),
                                             max_size=4)))
def test_any_yaml_document_gives_a_config_or_a_one_line_error(doc):
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        try:
            path.write_text(yaml.safe_dump(doc))
        except (UnicodeEncodeError, yaml.YAMLError):
            return  # not representable as a YAML file; nothing to load
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            msg = str(exc)
            assert "\n" not in msg and str(path) in msg, msg
            return
        assert cfg.model_dump()  # a valid document validated into every section


@FUZZ
@given(key=st.lists(st.one_of(st.sampled_from(SECTIONS), field_names, st.text(max_size=6)), min_size=0, max_size=3),
       raw=st.text(max_size=30), sep=st.sampled_from(["=", "", "=="]))
def test_any_override_gives_a_config_or_an_error_naming_the_field(key, raw, sep):
    text = ".".join(key) + sep + raw
    try:
        load_config(None, [text])
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and ("config field" in msg or "override" in msg), msg


def test_raw_bytes_config_files_are_refused_plainly(tmp_path):
    for data in (b"\xff\xfe\x00bad", b"run: [unclosed", b"- a list\n- of things\n", json.dumps({"run": 3}).encode()):
        path = tmp_path / "c.yaml"
        path.write_bytes(data)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
