"""Small file-system helpers shared by the stores that promise durability."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_dir(d: Path, *, tolerate_open_errors: bool = False) -> None:
    """fsync a directory, so the entries just created or renamed in it survive a crash.

    EINVAL from filesystems that cannot fsync a directory is ignored. With
    ``tolerate_open_errors``, a platform that cannot open a directory at all (EACCES,
    EISDIR, EINVAL) is skipped too; otherwise that raises ``OSError``. Blocking: call it
    from a worker thread."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError as e:
        if tolerate_open_errors and e.errno in (errno.EACCES, errno.EISDIR, errno.EINVAL):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def os_error_text(e: BaseException) -> str:
    """``e`` for an exception message that may be logged: an OSError's errno and
    strerror without its file names (storage paths are built from org and session
    ids), anything else by its type alone (its text is not known to be free of them)."""
    if isinstance(e, OSError) and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else e.strerror
    return type(e).__name__
