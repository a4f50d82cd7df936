"""Shared fixtures: small dataset files written by the tests themselves."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _own_lane_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stages keep the pace they reach in ``$LANE_CACHE_DIR`` (lane_ray/progress.py): a folder of the test
    session's, not the user's cache (subprocesses and Ray workers inherit it)."""
    os.environ["LANE_CACHE_DIR"] = str(tmp_path_factory.mktemp("lane-cache"))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = content.encode() if isinstance(content, str) else content
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# Three users, four movies; user 3 has a time tie broken by file order (items 4 then 2).
ML100K_DATA = "1\t1\t5\t100\n1\t2\t3\t200\n1\t3\t4\t300\n2\t3\t4\t100\n2\t1\t2\t150\n2\t4\t5\t90\n2\t2\t1\t400\n" \
              "3\t4\t4\t500\n3\t2\t3\t500\n3\t1\t5\t600\n"
ML100K_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|Shawshank Redemption, The (1994)|01-Jan-1994||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
    "3|Am\xe9lie (2001)|01-Jan-2001||http://x|0|0|0|0|0|1|0|0|0|0|0|0|0|0|1|0|0|0|0\n"
    "4|Alien (1979)|01-Jan-1979||http://x|0|1|0|0|0|0|0|0|0|0|0|1|0|0|0|0|1|0|0\n"
)


def write_ml100k(d: Path) -> Path:
    """The tiny MovieLens copy above, in the ml-100k layout, under ``d``."""
    write(d / "u.data", ML100K_DATA)
    write(d / "u.item", ML100K_ITEM.encode("latin-1"))
    return d


@pytest.fixture
def ml100k_dir(tmp_path: Path) -> Path:
    return write_ml100k(tmp_path / "ml-100k")


@pytest.fixture
def recbole_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rb"
    write(d / "toy.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
          + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in
                    [(1, 10, 1), (1, 11, 2), (1, 12, 3), (2, 12, 1), (2, 10, 2), (2, 11, 3), (2, 13, 4)]))
    write(d / "toy.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
          "10\tUsual Suspects, The\t1995\tCrime Thriller\n11\tHeat\t1995\tAction Crime\n"
          "12\tCasino\t1995\tDrama\n13\tBabe\tunknown\tComedy\n")
    return d


def amazon_records(layout: int) -> tuple[str, str]:
    reviews = [("A1", "B01", 5.0, 1000), ("A1", "B02", 4.0, 1100), ("A1", "B03", 3.0, 1200),
               ("A2", "B02", 5.0, 900), ("A2", "B03", 2.0, 950), ("A2", "B01", 1.0, 990), ("A2", "B09", 5.0, 999)]
    rev = "".join(json.dumps({"reviewerID": u, "asin": a, "overall": r, "unixReviewTime": t,
                              "reviewText": "ok"}) + "\n" for u, a, r, t in reviews)
    if layout == 2014:  # Python-literal dicts, categories as a list of lists
        meta = "".join(repr({"asin": a, "title": t, "categories": [["Beauty", c]]}) + "\n" for a, t, c in
                       [("B01", "Rose &amp; Oud Perfume", "Fragrance"), ("B02", "Lip Balm", "Lips"),
                        ("B03", "Night Cream", "Skin Care")])
    else:
        meta = "".join(json.dumps({"asin": a, "title": t, "category": ["Beauty", c], "main_cat": "Beauty"}) + "\n"
                       for a, t, c in [("B01", "Rose Perfume", "Fragrance"), ("B02", "Lip Balm", "Lips"),
                                       ("B03", "Night Cream", "Skin Care")])
    return rev, meta


def descendant_pids(marker: str) -> list[int]:
    """Processes started (transitively) by this one whose command line contains ``marker``: the actors of the session's
    local Ray cluster, which Ray titles ``ray::<Class>`` (e.g. ``ServeReplica:lane:Ranker``, ``EncodeBatch``)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session")
def serving_run(tmp_path_factory) -> Path:
    """A small run directory the serving tests score against (see tests/serving_run.py)."""
    pytest.importorskip("torch")
    from tests.serving_run import build_serving_run

    return build_serving_run(tmp_path_factory.mktemp("serving") / "run")
