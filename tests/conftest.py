"""Shared fixtures: where the shared data lies, CIFAR-10 for integration tests, an isolated cache."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """`$SYNTHGAP_SHARED_DATA`, else ../shared/data beside the checkout (York Urban, CIFAR-10 JPEGs)."""
    path = Path(os.environ.get("SYNTHGAP_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.fail(f"shared data folder {path} is missing: set SYNTHGAP_SHARED_DATA to the folder holding "
                    "york-urban-train/ and cifar10-jpeg.tar.gz")
    return path


@pytest.fixture(scope="session")
def cifar_dir(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 class-folder copy: `$SYNTHGAP_DATA_DIR`, else the shared archive unpacked into a temp dir."""
    if os.environ.get("SYNTHGAP_DATA_DIR"):
        return Path(os.environ["SYNTHGAP_DATA_DIR"])
    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(shared_data_dir / "cifar10-jpeg.tar.gz") as archive:
        archive.extractall(target, filter="data")
    return target / "cifar10"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own decoded-array cache unless it shares the session one explicitly."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SYNTHGAP_CACHE_DIR", str(cache))
    return cache
