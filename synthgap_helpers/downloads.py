"""Downloads into the cache: streamed with a progress bar, checksum-verified, atomic.

A download goes to a temporary `.part` file beside its destination and is renamed into place only
once every byte announced by the server has arrived and the checksum matches, so a file at the
destination is always complete. Every failure is a `DownloadError` naming the URL, the cache folder
and the setting that points at a local copy instead: an offline machine gets that, not a traceback. A cache
the disk refuses to write (full, read-only, a file-size limit) is a `WriteFailed` naming the destination instead.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from synthgap_helpers.errors import ChecksumError, DownloadError
from synthgap_helpers.storage import (
    file_mode,
    refused_by_disk,
    reporting_write_failures,
)

CHUNK_BYTES = 1 << 16
TIMEOUT_S = 60.0  # per network operation (connect, each read), not for the whole transfer
USER_AGENT = "synthgap-helpers"


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (archives can be large)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _expected(sha256: str | None, md5: str | None) -> tuple[str, str] | None:
    """(algorithm, lower-case hex digest) of the checksum to verify, or None when none is given."""
    if sha256 and md5:
        raise ValueError("give sha256 or md5, not both")
    if sha256:
        return "sha256", sha256.lower()
    return ("md5", md5.lower()) if md5 else None


def _matches(path: Path, expected: tuple[str, str] | None) -> bool:
    """Whether a file has the expected checksum (any file does when none is expected)."""
    return expected is None or file_digest(path, expected[0]) == expected[1]


def _fix(override: str | None, action: str = "rerun on a machine with internet access") -> str:
    """The advice every download error ends with."""
    instead = f", or get the file another way and set {override} to your local copy" if override else ""
    return f"Fix: {action}{instead}."


def _stream(url: str, out: BinaryIO, timeout: float, desc: str) -> None:
    """Copy the body of `url` into `out`; a body shorter than its Content-Length is an error, not a file."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers["Content-Length"]) if response.headers.get("Content-Length") else None
        received = 0
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:  # urllib does not raise when the server closes early
        raise http.client.IncompleteRead(b"", total - received)


def _reason(exc: BaseException) -> str:
    """A network failure in words."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    if isinstance(exc, http.client.IncompleteRead):
        return f"the transfer ended early, {exc.expected:,} bytes short"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach the server ({exc.reason})"
    return f"{type(exc).__name__}: {exc}"


def fetch(url: str, dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
          override: str | None = None, timeout: float = TIMEOUT_S) -> Path:
    """`url` downloaded to `dest`, verified against `sha256` or `md5`; returns `dest`.

    An existing `dest` with the right checksum (any existing `dest` when none is given) is reused without
    a request; one with another checksum is replaced. `override` names the setting that points at a local
    copy instead, for the error message. Raises DownloadError (WriteFailed when the disk refuses the file); a
    mismatching download is deleted.
    """
    dest = Path(dest)
    expected = _expected(sha256, md5)
    if dest.is_file():
        if _matches(dest, expected):
            return dest
        dest.unlink()
    with reporting_write_failures(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        part = Path(name)
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    _stream(url, out, timeout, desc=dest.name)
            except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: a malformed URL
                if refused_by_disk(exc):
                    raise  # the disk refused, not the network: WriteFailed
                raise DownloadError(f"could not download {url} into the cache folder {dest.parent}: "
                                    f"{_reason(exc)}.\n{_fix(override)}") from None
            if expected is not None and (got := file_digest(part, expected[0])) != expected[1]:
                raise ChecksumError(f"{url} does not match its {expected[0]} checksum: expected {expected[1]}, got "
                                    f"{got}; the download was deleted (cache folder {dest.parent}).\n"
                                    f"{_fix(override, 'retry later (a broken transfer or proxy changes the bytes)')}")
            os.chmod(part, file_mode())  # mkstemp's 0600 would keep a shared cache from other users
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    return dest
