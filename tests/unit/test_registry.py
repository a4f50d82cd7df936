"""The download path, tested against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from lane_ray.config import DataConfig
from lane_ray.data import load_dataset
from lane_ray.data.registry import REGISTRY, DatasetSpec, RemoteFile, resolve
from lane_ray.errors import DataError, DownloadError


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def ml1m_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        ratings = "1::1::5::10\n1::2::4::20\n1::3::3::30\n2::1::4::10\n2::2::4::11\n2::3::1::12\n"
        zf.writestr("ml-1m/ratings.dat", ratings)
        zf.writestr("ml-1m/movies.dat", "1::Heat (1995)::Action\n2::Babe (1995)::Comedy\n3::Casino (1995)::Drama\n")
    return buf.getvalue()


def spec(url: str, checksum: str | None) -> DatasetSpec:
    return DatasetSpec("tiny-1m", "movielens", "test", files=(RemoteFile(url, "ml-1m.zip", checksum, unzip=True),),
                       subdir="ml-1m")


def test_download_verify_unzip_and_load(http_dir, tmp_path):
    root, base = http_dir
    blob = ml1m_zip()
    (root / "ml-1m.zip").write_bytes(blob)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    reg = {"tiny-1m": spec(f"{base}/ml-1m.zip", "sha256:" + hashlib.sha256(blob).hexdigest())}
    folder, _ = resolve("tiny-1m", cfg, registry=reg)
    assert (folder / "ratings.dat").exists() and folder == tmp_path / "cache" / "tiny-1m" / "ml-1m"
    (root / "ml-1m.zip").unlink()  # second resolve is served from the cache
    folder2, _ = resolve("tiny-1m", cfg, registry=reg)
    assert folder2 == folder


def test_checksum_mismatch_is_refused_and_nothing_is_left(http_dir, tmp_path):
    root, base = http_dir
    (root / "ml-1m.zip").write_bytes(ml1m_zip())
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    reg = {"tiny-1m": spec(f"{base}/ml-1m.zip", "md5:" + "0" * 32)}
    with pytest.raises(DownloadError, match="md5 checksum mismatch"):
        resolve("tiny-1m", cfg, registry=reg)
    assert not (tmp_path / "cache" / "tiny-1m" / "ml-1m.zip").exists()


def test_unpinned_file_is_pinned_on_first_download(http_dir, tmp_path):
    root, base = http_dir
    (root / "ml-1m.zip").write_bytes(ml1m_zip())
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    reg = {"tiny-1m": spec(f"{base}/ml-1m.zip", None)}
    resolve("tiny-1m", cfg, registry=reg)
    archive = tmp_path / "cache" / "tiny-1m" / "ml-1m.zip"
    assert (archive.parent / "ml-1m.zip.sha256").read_text().strip() == hashlib.sha256(archive.read_bytes()).hexdigest()
    archive.write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        resolve("tiny-1m", cfg, registry=reg)


def test_without_network_says_what_to_download_and_where(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    reg = {"tiny-1m": spec(f"http://127.0.0.1:{port}/ml-1m.zip", "md5:abc")}
    with pytest.raises(DownloadError) as exc:
        resolve("tiny-1m", cfg, registry=reg, timeout=5)
    msg = str(exc.value)
    assert "could not be downloaded" in msg and f"127.0.0.1:{port}/ml-1m.zip" in msg
    assert str(tmp_path / "cache" / "tiny-1m" / "ml-1m.zip") in msg and "\n" not in msg


def test_placed_by_hand_is_used(tmp_path):
    folder = tmp_path / "cache" / "ml-1m" / "ml-1m"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(io.BytesIO(ml1m_zip())) as zf:
        for name in ("ratings.dat", "movies.dat"):
            (folder / name).write_bytes(zf.read(f"ml-1m/{name}"))
    p = load_dataset(DataConfig(dataset="ml-1m", cache_dir=str(tmp_path / "cache")))
    assert p.stats()["interactions"] == 6


def test_registered_names_and_unknown():
    assert {"ml-100k", "ml-1m", "amazon-beauty", "steam"} <= set(REGISTRY)
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        resolve("nope")


def test_ml100k_resolves_offline_from_recbole():
    folder, spec_ = resolve("ml-100k")
    assert (folder / "ml-100k.inter").exists() and spec_.format == "recbole"
    assert Path(folder).parts[-3:] == ("recbole", "dataset_example", "ml-100k")
