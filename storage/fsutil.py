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
