"""Blob stores for finished session replays.

A :class:`BlobStore` holds immutable-ish objects under ``/``-separated keys
(``{org_id}/{session_id}.bin.gz``, see :func:`blob_key`).  ``put`` is only
successful once what the store holds has been read back and its size and
SHA-256 match the bytes given: a session counts as finalised only after a
successful ``put``.

Cancellation, common to all stores: a ``put`` that *returns* has stored and
verified the object.  A ``put`` that raises (``Cancelled`` or an error) must
be treated as not stored; the complete object may nevertheless be there, but
never a partial one under the key (filesystem: atomic rename; S3: a single
PUT or CompleteMultipartUpload is atomic).  ``put`` is idempotent -- writing
the same key again with the same bytes is harmless -- so the caller simply
retries.  Blocking work runs in worker threads that are not abandoned: a
cancellation arriving while a thread runs takes effect when it returns (at
the next checkpoint), so it may also surface just after a successful ``put``
returned.  ``trio.Cancelled`` is never swallowed.

Errors: :class:`BlobNotFound` (missing key), :class:`BlobVerifyError` (the
read-back does not match), :class:`BlobStoreError` (everything else, with the
underlying exception chained); invalid keys raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

import trio

from storage.fsutil import fsync_dir, os_error_text

__all__ = [
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "BlobVerifyError",
    "FilesystemBlobStore",
    "MemoryBlobStore",
    "blob_key",
    "check_key",
    "sha256_hex",
]

T = TypeVar("T")

_SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_KEY_BYTES: Final = 1024


class BlobStoreError(Exception):
    """A blob store operation failed; the cause is chained.

    ``key`` is the blob's key (None if the failure concerns no one blob). Keys are
    ``{org_id}/{session_id}.bin.gz`` and join to a patient, and these errors are
    logged with their tracebacks, so the message never names the key (nor a path
    or URL built from it): read ``key``."""

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key


class BlobNotFound(BlobStoreError):
    """No object under the key (``key``)."""

    def __init__(self, key: str) -> None:
        super().__init__("no such blob", key=key)


class BlobVerifyError(BlobStoreError):
    """The stored object does not match what was written (size or SHA-256)."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    sha256: str  # lowercase hex


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> BlobInfo:
        """Store ``data`` under ``key``, read back its size and SHA-256 and
        return them; BlobVerifyError if they differ from ``data``."""
        ...

    async def get(self, key: str) -> bytes:
        """The object's bytes; BlobNotFound if missing."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def aclose(self) -> None:
        """Release resources; the store must not be used afterwards."""
        ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_segment(name: str, v: str) -> None:
    if not isinstance(v, str) or not _SEGMENT.fullmatch(v) or v in (".", ".."):
        raise ValueError(
            f"{name} is not a safe path segment "
            "(1-128 chars of A-Z a-z 0-9 . _ -, not starting with . _ -)"
        )


def blob_key(org_id: str, session_id: str) -> str:
    """The replay key ``{org_id}/{session_id}.bin.gz``; ValueError for unsafe ids."""
    _check_segment("org_id", org_id)
    _check_segment("session_id", session_id)
    return f"{org_id}/{session_id}.bin.gz"


def check_key(key: str) -> list[str]:
    """Validate a store key and return its segments.  Rejects empty, absolute,
    ``.``/``..``, empty segments, backslashes and control characters."""
    if not isinstance(key, str) or not key:
        raise ValueError("blob key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ValueError(f"blob key longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError("blob key is absolute or has forbidden characters")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("blob key has an empty, '.' or '..' segment")
    return parts


class FilesystemBlobStore(BlobStore):
    """Blobs as files under ``root`` (the embedded default).

    ``put`` runs in one worker thread (``trio.to_thread.run_sync`` under
    ``limiter``; None means Trio's default limiter): write a temp file in the
    target directory, fsync, ``os.replace`` onto the key, fsync the directory,
    then re-read the file and compare size and SHA-256.  That whole sequence is
    one thread call, which is not abandoned on cancellation: cancelled while
    waiting for a limiter slot, ``put`` raises ``Cancelled`` having written
    nothing; cancelled once the thread runs, the thread always finishes (rename
    done, or its temp file removed on error) and ``put`` returns or raises as
    the thread did, the cancellation following at the next checkpoint.  The key
    holds either the old or the complete new object.  Only a process crash
    mid-write can leave a ``.<name>.*.tmp`` file (never visible as a key).
    OSErrors become BlobStoreError; a read-back mismatch BlobVerifyError.
    """

    def __init__(self, root: Path, limiter: trio.CapacityLimiter | None = None) -> None:
        self.root = Path(root).absolute()
        self._limiter = limiter
        self._closed = False

    def _path(self, key: str) -> Path:
        p = self.root.joinpath(*check_key(key))
        if os.path.commonpath([self.root, p]) != str(self.root):  # belt and braces
            raise ValueError("blob key escapes the store root")
        return p

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise BlobStoreError("blob store is closed")
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def put(self, key: str, data: bytes) -> BlobInfo:
        path = self._path(key)
        data = bytes(data)
        return await self._run(lambda: self._put_sync(key, path, data))

    def _put_sync(self, key: str, path: Path, data: bytes) -> BlobInfo:
        want = sha256_hex(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(path.parent, tolerate_open_errors=True)
            stored = self._read_back(path)
        except OSError as e:
            raise BlobStoreError(f"writing a blob failed: {os_error_text(e)}", key=key) from e
        got = BlobInfo(key, len(stored), sha256_hex(stored))
        if got.size != len(data) or got.sha256 != want:
            raise BlobVerifyError(
                f"blob read back as {got.size} bytes sha256 {got.sha256}, "
                f"wrote {len(data)} bytes sha256 {want}", key=key
            )
        return got

    def _read_back(self, path: Path) -> bytes:
        """What verification reads (a seam for failure-injection tests)."""
        return path.read_bytes()

    async def get(self, key: str) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            try:
                return path.read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
                raise BlobNotFound(key) from e
            except OSError as e:
                raise BlobStoreError(f"reading a blob failed: {os_error_text(e)}",
                                     key=key) from e

        return await self._run(read)

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        return await self._run(path.is_file)

    async def aclose(self) -> None:
        self._closed = True


class MemoryBlobStore(BlobStore):
    """In-memory store for tests, with failure injection.

    * ``fail_puts``: the next N ``put`` calls raise ``put_error`` (default a
      BlobStoreError) without storing anything.
    * ``corrupt_puts``: the next N ``put`` calls store damaged bytes (last byte
      flipped), so the real verification raises BlobVerifyError.
    * ``put_delay``: seconds ``put`` sleeps (``trio.sleep``; cancellable,
      nothing stored if cancelled there) before storing.

    ``objects`` is the live dict of stored bytes; ``put_calls`` counts calls.
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.put_calls = 0
        self.fail_puts = 0
        self.put_error: BaseException | None = None
        self.corrupt_puts = 0
        self.put_delay = 0.0
        self._closed = False

    def _check(self, key: str) -> None:
        if self._closed:
            raise BlobStoreError("blob store is closed")
        check_key(key)

    async def put(self, key: str, data: bytes) -> BlobInfo:
        self._check(key)
        self.put_calls += 1
        data = bytes(data)
        await trio.sleep(self.put_delay)  # a checkpoint even when 0: cancellable before storing
        if self.fail_puts > 0:
            self.fail_puts -= 1
            raise self.put_error or BlobStoreError("injected put failure", key=key)
        stored = data
        if self.corrupt_puts > 0 and data:
            self.corrupt_puts -= 1
            stored = data[:-1] + bytes([data[-1] ^ 0xFF])
        self.objects[key] = stored
        got = BlobInfo(key, len(stored), sha256_hex(stored))
        want = sha256_hex(data)
        if got.size != len(data) or got.sha256 != want:
            raise BlobVerifyError(f"blob read back sha256 {got.sha256}, wrote {want}",
                                  key=key)
        return got

    async def get(self, key: str) -> bytes:
        self._check(key)
        await trio.lowlevel.checkpoint()
        try:
            return self.objects[key]
        except KeyError:
            raise BlobNotFound(key) from None

    async def exists(self, key: str) -> bool:
        self._check(key)
        await trio.lowlevel.checkpoint()
        return key in self.objects

    async def aclose(self) -> None:
        self._closed = True
