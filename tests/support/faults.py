"""Failure injection, and everything a fault-injection test needs under one name.

:class:`DiskFull` and :class:`BlobStoreDown` wrap the real spool and blob store so
that their own error handling runs. The fault tests import this module as ``fu``;
the other names here are re-exported from where they live in ``tests/support``.
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from tests.support.datadir import files_under, outbox_pending, spool_keys
from tests.support.payloads import auth
from tests.support.ports import free_port
from tests.support.processes import Child, child, service, service_env, sink
from tests.support.rawhttp import RawHttp
from tests.support.ready import poll
from tests.support.s3 import AWS_ENV

__all__ = [
    "AWS_ENV", "BlobStoreDown", "Child", "DiskFull", "RawHttp", "auth", "child",
    "files_under", "free_port", "outbox_pending", "poll", "service", "service_env", "sink",
    "spool_keys",
]


class DiskFull:
    """Failure injection: a real :class:`~storage.spool.Spool` whose commits fail
    with ENOSPC while :attr:`full` is set, as on a full data disk (the spool's own
    error handling runs: the log is rolled back, the state file is not replaced,
    waiters get ``SpoolError``). Everything else is the real spool."""

    def __init__(self, spool: Any, *, full: bool = True) -> None:
        self.full = full
        self.failed = 0
        real = spool._commit_key

        def commit_key(*args: Any) -> None:
            if self.full:
                self.failed += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            real(*args)

        spool._commit_key = commit_key  # an instance attribute: this spool only


class BlobStoreDown:
    """Failure injection: a real blob store whose ``put`` raises ``BlobStoreError``
    while :attr:`down` is set (``attempts`` counts them); reads are untouched."""

    def __init__(self, store: Any, *, down: bool = True) -> None:
        from storage.blobs import BlobStoreError

        self.down = down
        self.attempts = 0
        real = store.put

        async def put(key: str, data: bytes) -> Any:
            if self.down:
                self.attempts += 1
                await trio.lowlevel.checkpoint()
                raise BlobStoreError("injected: blob store down")
            return await real(key, data)

        store.put = put
