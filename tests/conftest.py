"""Shared fixtures: where the shared data lies, CIFAR-10 for integration tests, an isolated cache."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # pytest -n N: N workers share the cores, so each worker (and every process it starts) gets its share of
    # torch's threads instead of one per core each, which oversubscribes the CPU and makes them wait for
    # one another. Results do not depend on it (the smoke reference holds for 1 and 2 threads).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


def needs_or_skip(reason: str) -> None:
    """Something a test needs is missing: skip it with `reason` shown in pytest's summary, except under `CI=true`,
    where CI provides everything and a missing prerequisite is a failure. The one rule for all such tests."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true, yet a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="needs_or_skip", scope="session")
def needs_or_skip_fixture():
    """`needs_or_skip` for test modules (they take it as a fixture rather than importing conftest)."""
    return needs_or_skip


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """`$SYNTHGAP_SHARED_DATA`, else ../shared/data beside the checkout (York Urban, CIFAR-10 JPEGs).

    Missing: the tests that need it are skipped (failed under CI=true)."""
    path = Path(os.environ.get("SYNTHGAP_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        needs_or_skip(f"needs the full datasets (York Urban images, the whole CIFAR-10): no folder {path}; "
                      "set SYNTHGAP_SHARED_DATA to a folder holding york-urban-train/ and cifar10-jpeg.tar.gz")
    return path


@pytest.fixture(scope="session")
def cifar_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 class-folder copy: `$SYNTHGAP_DATA_DIR`, else the shared archive unpacked into a temp dir
    (skipped, or failed under CI=true, when neither is there)."""
    if os.environ.get("SYNTHGAP_DATA_DIR"):
        return Path(os.environ["SYNTHGAP_DATA_DIR"])
    shared_data_dir: Path = request.getfixturevalue("shared_data_dir")
    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(shared_data_dir / "cifar10-jpeg.tar.gz") as archive:
        archive.extractall(target, filter="data")
    return target / "cifar10"


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory):
    """The decoded-array cache of session- and module-scoped fixtures (set up before `isolated_cache`): never the
    user's ~/.cache/synthgap, which other test processes (pytest -n, another checkout's tests) also write."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SYNTHGAP_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own decoded-array cache unless it shares the session one explicitly."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SYNTHGAP_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def pipe():
    """The tiny random-weight SD pipeline, run single-threaded: its ops are far too small to gain from a thread
    pool, and on a busy CPU the pool's spinning threads make each op wait for a core (10x slower)."""
    import torch

    from synthgap_helpers.sd.pipelines import tiny_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_pipeline(seed=0)
    torch.set_num_threads(threads)
