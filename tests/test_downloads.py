"""Downloads against a real HTTP server on 127.0.0.1 serving archives in the published formats, built here:
the fetch plumbing, CIFAR-10 through torchvision's download, York Urban's archive, conversion and resolver."""

from __future__ import annotations

import collections
import errno
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from synthgap_helpers import datasets
from synthgap_helpers.data import DataError
from synthgap_helpers.datasets import load_dataset as load_cifar10
from synthgap_helpers.downloads import fetch
from synthgap_helpers.errors import ChecksumError, DownloadError, WriteFailed
from synthgap_helpers.geometry.validation import load_york_urban
from synthgap_helpers.geometry.york_urban import (
    YorkUrbanArchive,
    resolve_york_urban,
    york_urban_from_archive,
)
from synthgap_helpers.imagesets import CIFAR10_CLASSES as CLASSES

PIXEL_SIZE_MM = 0.00896875  # cameraParameters.mat of the published archive (pixelSize)


class Server:
    """Files served from memory by http.server in a thread; counts the GET requests of each path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()  # paths whose body stops halfway (Content-Length announces all of it)
        self.gets: collections.Counter[str] = collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets[self.path] += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in server.truncated else body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, truncated: bool = False) -> str:
        """Serve `body` at `path`; returns its URL."""
        self.files[path] = body
        if truncated:
            self.truncated.add(path)
        return self.url(path)


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    running.thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL on a local port nothing listens on (connection refused, as offline). The port stays bound, not
    listening, for the test's duration, so no other test running at the same time (pytest -n) can take it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{probe.getsockname()[1]}/archive"


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders a download or conversion may leave behind."""
    return [p.name for p in folder.rglob(".*")] if folder.exists() else []


def files_in(folder: Path) -> list[str]:
    """Every file under `folder` (empty folders are not files that could look finished)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- archives


def cifar_archive(per_file: int = 4, seed: int = 0) -> bytes:
    """`cifar-10-python.tar.gz` as published: `cifar-10-batches-py/` with pickled batches (the official keys)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, content: dict) -> None:
            payload = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add(name, {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(per_file)],
                       b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                       b"filenames": [f"{name}_{i}.png".encode() for i in range(per_file)]})
        add("batches.meta", {b"num_cases_per_batch": per_file, b"label_names": [c.encode() for c in CLASSES],
                             b"num_vis": 3072})
    return buffer.getvalue()


def jpeg(width: int, height: int, seed: int) -> bytes:
    """A small JPEG with a gradient."""
    pixels = (np.add.outer(np.arange(height), np.arange(width)) * (seed + 1) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(buffer, format="JPEG")
    return buffer.getvalue()


def names_cell(names: list[str]) -> np.ndarray:
    """A MATLAB cell column of names, each ending in a path separator as in Manhattan_Image_DB_Names.mat."""
    cell = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cell[i, 0] = name + "\\"
    return cell


def write_york_archive(folder: Path, images: dict[str, dict], camera: np.ndarray, train: list[int],
                       test: list[int]) -> Path:
    """An unpacked York Urban archive `folder/YorkUrbanDB/` in the published layout from annotation-format records
    (converted back: 1-based pixels, vp columns, lines as 2N x 2); returns the YorkUrbanDB folder."""
    root = folder / "YorkUrbanDB"
    root.mkdir(parents=True)
    scipy.io.savemat(root / "cameraParameters.mat", {"focal": camera[0, 0] * PIXEL_SIZE_MM, "pixelSize": PIXEL_SIZE_MM,
                                                     "pp": camera[:2, 2][None] + 1.0})
    scipy.io.savemat(root / "Manhattan_Image_DB_Names.mat", {"Manhattan_Image_DB_Names": names_cell(list(images))})
    split = {"trainingSetIndex": np.array(train, float)[:, None], "testSetIndex": np.array(test, float)[:, None]}
    scipy.io.savemat(root / "ECCV_TrainingAndTestImageNumbers.mat", split)
    for name, record in images.items():
        (root / name).mkdir()
        (root / name / f"{name}.jpg").write_bytes(record["jpeg"])
        lines = (np.asarray(record["segments"], float) + 1.0).reshape(-1, 2)  # endpoints on consecutive rows
        association = np.array(record["segment_vp"], float)[:, None]
        scipy.io.savemat(root / name / f"{name}LinesAndVP.mat",
                         {"lines": lines, "vp_association": association, "finalImg": np.zeros((4, 4), np.uint8)})
        directions = np.asarray(record["vp_directions"], float)
        scipy.io.savemat(root / name / f"{name}GroundTruthVP_CamParams.mat", {"vp": directions.T})
        scipy.io.savemat(root / name / f"{name}GroundTruthVP_Orthogonal_CamParams.mat", {"vp_orthogonal": directions.T})
    return root


TINY_CAMERA = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])
TINY_NAMES = ["P0000001", "P0000002", "P0000003", "P0000004"]
TINY_TRAIN, TINY_TEST = [3, 1], [2, 4]  # 1-based, as in ECCV_TrainingAndTestImageNumbers.mat


def tiny_records() -> dict[str, dict]:
    """Four 64 x 48 images with three vanishing directions and two segments each."""
    rng = np.random.default_rng(0)
    records = {}
    for seed, name in enumerate(TINY_NAMES):
        frame, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        directions = frame.T * np.sign(frame.T[:, 2:3])  # rows, pointing forward
        records[name] = {"jpeg": jpeg(64, 48, seed), "vp_directions": directions.tolist(),
                         "segments": [[1.5, 2.0, 30.25, 40.0], [10.0, 5.5, 12.0, 44.0]], "segment_vp": [1, 3]}
    return records


def tiny_zip(folder: Path) -> bytes:
    """YorkUrbanDB.zip of the four tiny images, as the Elder Lab publishes it (one top folder)."""
    root = write_york_archive(folder, tiny_records(), TINY_CAMERA, TINY_TRAIN, TINY_TEST)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for file in sorted(root.rglob("*")):
            bundle.write(file, file.relative_to(root.parent).as_posix())
    return buffer.getvalue()


def tiny_archive(url: str, body: bytes | None = None) -> YorkUrbanArchive:
    """The description of a tiny archive at `url` (pinned to `body`'s sha256 when given)."""
    return YorkUrbanArchive(url=url, sha256=hashlib.sha256(body).hexdigest() if body else None, images=4, per_split=2)


# --------------------------------------------------------------------------------------------- fetch


def test_fetch_lands_a_verified_file_and_reuses_it_without_a_request(server, tmp_path):
    body = b"archive bytes" * 1000
    url = server.serve("/a.bin", body)
    dest = tmp_path / "cache" / "a.bin"
    assert fetch(url, dest, sha256=hashlib.sha256(body).hexdigest()) == dest and dest.read_bytes() == body
    assert fetch(url, dest, md5=hashlib.md5(body).hexdigest()) == dest
    assert server.gets["/a.bin"] == 1 and leftovers(dest.parent) == []


def test_fetch_checksum_mismatch_says_expected_and_got_and_deletes_the_file(server, tmp_path):
    url = server.serve("/a.bin", b"tampered")
    dest = tmp_path / "cache" / "a.bin"
    with pytest.raises(ChecksumError) as error:
        fetch(url, dest, sha256="0" * 64)
    message = str(error.value)
    assert f"expected {'0' * 64}, got {hashlib.sha256(b'tampered').hexdigest()}" in message and url in message
    assert not dest.exists() and leftovers(dest.parent) == []


def test_fetch_onto_a_full_disk_names_the_file_and_the_disk_not_the_network(server, tmp_path, monkeypatch):
    class FullDisk(io.BytesIO):
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    url = server.serve("/a.bin", b"archive bytes" * 1000)
    dest = tmp_path / "cache" / "a.bin"
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: (os.close(fd), FullDisk())[1])
    with pytest.raises(WriteFailed, match=f"could not write {dest}: No space left on device; free space"):
        fetch(url, dest)
    assert not dest.exists() and leftovers(dest.parent) == []


def test_fetch_offline_names_the_url_the_cache_folder_and_the_override(refused_url, tmp_path):
    dest = tmp_path / "cache" / "a.bin"
    with pytest.raises(DownloadError) as error:
        fetch(refused_url, dest, override="geometry.york_urban_root")
    message = str(error.value)
    assert refused_url in message and str(dest.parent) in message and "geometry.york_urban_root" in message
    assert "cannot reach the server" in message and not dest.exists()


def test_fetch_truncated_transfer_leaves_nothing_that_looks_finished(server, tmp_path):
    url = server.serve("/a.bin", bytes(range(256)) * 400, truncated=True)
    dest = tmp_path / "cache" / "a.bin"
    with pytest.raises(DownloadError, match="ended early, 51,200 bytes short"):
        fetch(url, dest)  # no checksum: only the announced length can tell
    assert not dest.exists() and leftovers(dest.parent) == []


def test_fetch_http_error_is_named(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url("/missing"), tmp_path / "a.bin")


# --------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar_download_lands_in_the_cache_and_is_not_fetched_again(server, tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHGAP_DATA_DIR", raising=False)
    body = cifar_archive()
    url = server.serve("/cifar-10-python.tar.gz", body)
    cache = tmp_path / "cache"
    batches = datasets._download(cache, url=url, md5=hashlib.md5(body).hexdigest())
    assert batches == cache / "download" / "cifar-10-batches-py" and (batches / "batches.meta").is_file()
    requests = server.gets["/cifar-10-python.tar.gz"]  # torchvision's redirect probe is a GET too
    test = load_cifar10("test", download=True, cache_dir=cache)
    assert len(test) == 4 and test.report.source == str(batches)
    assert len(load_cifar10("train", download=True, cache_dir=cache)) == 20
    assert datasets._download(cache, url=url, md5=hashlib.md5(body).hexdigest()) == batches  # the archive is reused
    assert server.gets["/cifar-10-python.tar.gz"] == requests and leftovers(cache) == []


def test_cifar_md5_mismatch_says_expected_and_got_and_deletes_the_archive(server, tmp_path):
    body = cifar_archive()
    url = server.serve("/cifar-10-python.tar.gz", body)
    with pytest.raises(DownloadError) as error:
        datasets._download(tmp_path, url=url, md5="0" * 32)
    assert f"expected {'0' * 32}, got {hashlib.md5(body).hexdigest()}" in str(error.value)
    assert files_in(tmp_path) == []


def test_cifar_offline_names_the_url_the_cache_folder_and_the_overrides(refused_url, tmp_path):
    with pytest.raises(DownloadError) as error:
        datasets._download(tmp_path, url=refused_url, md5="0" * 32)
    message = str(error.value)
    assert refused_url in message and str(tmp_path / "download") in message
    assert "data.root" in message and "$SYNTHGAP_DATA_DIR" in message and "refused" in message


def test_cifar_truncated_download_leaves_no_archive_and_no_batches(server, tmp_path):
    body = cifar_archive()
    url = server.serve("/cifar-10-python.tar.gz", body, truncated=True)
    with pytest.raises(DownloadError, match="MD5 mismatch"):
        datasets._download(tmp_path, url=url, md5=hashlib.md5(body).hexdigest())
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------------------------- York Urban


def test_conversion_gives_the_annotations_that_load_york_urban_reads(tmp_path):
    records = tiny_records()
    write_york_archive(tmp_path / "unpacked", records, TINY_CAMERA, TINY_TRAIN, TINY_TEST)
    archive = tiny_archive("unused")
    converted = york_urban_from_archive(tmp_path / "unpacked", tmp_path / "train", "train", archive)
    loaded = load_york_urban(converted)
    assert [r["image"] for r in loaded] == ["P0000001.jpg", "P0000003.jpg"]  # the training split
    assert sorted(p.name for p in converted.iterdir()) == ["P0000001.jpg", "P0000003.jpg", "annotations.json"]
    content = json.loads((converted / "annotations.json").read_text())
    assert set(content) == {"source", "convention", "images"}
    first = loaded[0]
    assert (first["width"], first["height"]) == (64, 48) and first["segment_vp"] == [1, 3]
    np.testing.assert_allclose(first["K"], TINY_CAMERA, atol=1e-12)
    np.testing.assert_allclose(first["segments"], records["P0000001"]["segments"], atol=1e-9)
    directions = np.asarray(first["vp_directions"])
    np.testing.assert_allclose(directions, records["P0000001"]["vp_directions"], atol=1e-12)
    projected = (TINY_CAMERA @ np.diag([1.0, -1.0, 1.0]) @ directions.T).T
    np.testing.assert_allclose(first["vp_pixels"], projected[:, :2] / projected[:, 2:], rtol=1e-12)
    test_split = york_urban_from_archive(tmp_path / "unpacked", tmp_path / "test", "test", archive)
    assert [r["image"] for r in load_york_urban(test_split)] == ["P0000002.jpg", "P0000004.jpg"]


def test_conversion_reproduces_the_published_conversion_of_real_images(tmp_path, shared_data_dir):
    """Two real images of the shared converted folder, written back in the archive's layout and converted again:
    K, directions, segments and (computed independently) vp_pixels come back unchanged."""
    shared = shared_data_dir / "york-urban-train"
    images = json.loads((shared / "annotations.json").read_text())["images"]
    names = sorted(images)[:2]
    records = {name: dict(images[name], jpeg=(shared / images[name]["image"]).read_bytes()) for name in names}
    camera = np.asarray(images[names[0]]["K"])
    write_york_archive(tmp_path / "unpacked", records, camera, [1], [2])
    converted = york_urban_from_archive(tmp_path / "unpacked", tmp_path / "train", "train",
                                        YorkUrbanArchive(images=2, per_split=1))
    (again,) = load_york_urban(converted)
    original = images[names[0]]
    assert (again["image"], again["width"], again["height"], again["segment_vp"]) == (
        original["image"], 640, 480, original["segment_vp"])
    for key in ("K", "vp_directions", "vp_pixels", "segments"):
        np.testing.assert_allclose(again[key], original[key], rtol=1e-9, atol=1e-6, err_msg=key)


def test_download_converts_once_records_the_checksum_and_reuses_the_cache(server, tmp_path):
    body = tiny_zip(tmp_path / "build")
    archive = tiny_archive(server.serve("/YorkUrbanDB.zip", body))
    cache = tmp_path / "cache"
    root = resolve_york_urban(None, cache, download=True, archive=archive)
    assert root == cache / "york-urban" / "download" / "train" and len(load_york_urban(root)) == 2
    record = cache / "york-urban" / "YorkUrbanDB.zip.sha256"
    assert record.read_text().strip() == hashlib.sha256(body).hexdigest()  # no published checksum: recorded
    assert resolve_york_urban(None, cache, download=False, archive=archive) == root
    assert resolve_york_urban(None, cache, download=True, archive=archive) == root
    assert server.gets["/YorkUrbanDB.zip"] == 1 and leftovers(cache) == []


def test_a_changed_archive_is_refused_against_the_recorded_checksum(server, tmp_path):
    body = tiny_zip(tmp_path / "build")
    url = server.serve("/YorkUrbanDB.zip", body)
    cache = tmp_path / "cache"
    resolve_york_urban(None, cache, download=True, archive=tiny_archive(url))
    shutil.rmtree(cache / "york-urban" / "download")
    (cache / "york-urban" / "YorkUrbanDB.zip").unlink()
    server.serve("/YorkUrbanDB.zip", body + b"changed")
    with pytest.raises(ChecksumError) as error:
        resolve_york_urban(None, cache, download=True, archive=tiny_archive(url))
    message = str(error.value)
    assert f"expected {hashlib.sha256(body).hexdigest()}" in message and "recorded at the first download" in message
    assert not (cache / "york-urban" / "YorkUrbanDB.zip").exists()


def test_pinned_checksum_mismatch_and_offline_errors_name_url_cache_and_override(server, refused_url, tmp_path):
    body = tiny_zip(tmp_path / "build")
    url = server.serve("/YorkUrbanDB.zip", body)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match=f"got {hashlib.sha256(body).hexdigest()}"):
        resolve_york_urban(None, cache, download=True, archive=tiny_archive(url, b"other bytes"))
    with pytest.raises(DownloadError) as error:
        resolve_york_urban(None, cache, download=True, archive=tiny_archive(refused_url))
    message = str(error.value)
    assert refused_url in message and str(cache / "york-urban") in message and "geometry.york_urban_root" in message
    assert not (cache / "york-urban" / "download").exists()


def test_a_page_instead_of_the_archive_is_neither_kept_nor_recorded(server, tmp_path):
    url = server.serve("/YorkUrbanDB.zip", b"<!DOCTYPE html><html>please log in</html>")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not a readable zip archive"):
        resolve_york_urban(None, cache, download=True, archive=tiny_archive(url))
    assert files_in(cache) == []


def test_truncated_york_download_leaves_nothing_that_looks_finished(server, tmp_path):
    body = tiny_zip(tmp_path / "build")
    url = server.serve("/YorkUrbanDB.zip", body, truncated=True)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="ended early"):
        resolve_york_urban(None, cache, download=True, archive=tiny_archive(url))
    assert files_in(cache) == []


def test_an_incomplete_archive_names_the_missing_file(tmp_path):
    root = write_york_archive(tmp_path / "unpacked", tiny_records(), TINY_CAMERA, TINY_TRAIN, TINY_TEST)
    (root / "P0000004" / "P0000004GroundTruthVP_Orthogonal_CamParams.mat").unlink()  # a test image: all are checked
    with pytest.raises(DataError, match="P0000004GroundTruthVP_Orthogonal_CamParams.mat"):
        york_urban_from_archive(root, tmp_path / "train", "train", tiny_archive("unused"))
    with pytest.raises(DataError, match="lists 4 names .* expected 102"):
        york_urban_from_archive(root, tmp_path / "train", "train")  # the published archive's description
    assert not (tmp_path / "train").exists() and leftovers(tmp_path) == []


def test_resolver_order_sample_then_explicit_folder_then_cache_then_download(server, tmp_path):
    body = tiny_zip(tmp_path / "build")
    archive = tiny_archive(server.serve("/YorkUrbanDB.zip", body), body)
    cache = tmp_path / "cache"
    downloaded = resolve_york_urban(None, cache, download=True, archive=archive)
    assert resolve_york_urban(None, cache, download=False, archive=archive) == downloaded  # the cache is reused
    # an explicit converted folder wins over the cache and the download
    mine = york_urban_from_archive(tmp_path / "build", tmp_path / "mine", "train", archive)
    assert resolve_york_urban(mine, cache, download=True, archive=archive) == mine
    # an explicit unpacked archive or zip is converted once into the cache
    unpacked = resolve_york_urban(tmp_path / "build", cache, download=False, archive=archive)
    assert unpacked.parent.parent == cache / "york-urban" and len(load_york_urban(unpacked)) == 2
    (tmp_path / "YorkUrbanDB.zip").write_bytes(body)
    zipped = resolve_york_urban(tmp_path / "YorkUrbanDB.zip", cache, download=False, archive=archive)
    assert len(load_york_urban(zipped)) == 2
    (tmp_path / "YorkUrbanDB.zip").unlink()
    assert resolve_york_urban(tmp_path / "YorkUrbanDB.zip", cache, download=False, archive=archive) == zipped
    assert server.gets["/YorkUrbanDB.zip"] == 1


def test_resolver_errors_name_the_url_the_cache_and_the_override(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        resolve_york_urban(None, cache, download=False)
    message = str(error.value)
    assert "smd_process_download=1&download_id=8288" in message and str(cache / "york-urban") in message
    assert "geometry.york_urban_root" in message and "data.download" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"geometry.york_urban_root = .*empty holds neither annotations.json"):
        resolve_york_urban(tmp_path / "empty", cache, download=True)
    with pytest.raises(DataError, match=r"geometry.york_urban_root = .*nowhere does not exist"):
        resolve_york_urban(tmp_path / "nowhere", cache, download=True)
