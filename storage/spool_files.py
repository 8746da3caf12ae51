"""The spool's file side: what its worker threads do to the disk.

Committing one key's operations (appends, state replacement, removal) to its files,
creating directories, reading a log back and cutting a torn tail, and the
fsync-before-acknowledge primitives. Everything here blocks: the spool
(:mod:`storage.spool`) calls it in worker threads. See that module for the
guarantees these pieces add up to.

Files under ``root``, for a key ``"org-a/sess-1"`` (1-4 safe path segments)::

    org-a/sess-1.log           the records, appended in order
    org-a/sess-1.state.json    the finalisation state (set_state), replaced atomically
    org-a/.sess-1.state.json.tmp   only ever seen after a crash; removed on start-up

Commit round (the committer): take every operation queued since the last round;
for each key, in queue order, append records / replace the state file / delete
the files; fsync each dirty log; then fsync the directories whose entries changed
(new files, renames, deletions, new directories); then wake every waiter of the
round. Files are opened and closed within the round: open+close costs ~3 us per
file against 80-300 us for its fsync on this machine, and with thousands of
sessions each appending about once a second an LRU of handles would miss on
nearly every round anyway; it would also keep handles on files being deleted.
Rounds start as soon as there is work, at most once per ``fsync_interval_s``.
A round's keys are split over up to ``fsync_threads`` concurrent worker-thread
calls (under ``limiter``; default: the spool's own limiter of that size): fsyncs of
different files in parallel were 2-5x faster than in sequence on this machine's
ext4 (see ``bench/bench_spool.py``); ``fsync_threads=1`` commits each round in one
thread call. Group commit saves thread hops and batches directory fsyncs; each
dirty file still costs one fsync per round, since fsync is per file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from storage.fsutil import fsync_dir
from storage.journal import Record
from storage.spool_format import HEADER, check_key, encode_record, read_one, tag

log = logging.getLogger("telemetry.spool")

LOG_SUFFIX, STATE_SUFFIX = ".log", ".state.json"


@dataclass(eq=False)
class Op:
    """One queued operation on a key."""

    key: str
    what: str  # "append" | "state" | "remove"
    kind: int = 0
    data: bytes = b""
    need: int = 0  # bytes reserved against the budget
    level: int = 0  # zlib level for an append; 0 = store as is
    cancelled: bool = False


@dataclass
class KeyResult:
    size: int | None  # log size on disk after the round; None = no log
    error: BaseException | None = None
    dirent: bool = False  # a directory entry changed: the directory needs an fsync
    broken: bool = False


@dataclass
class Chunk:
    keys: dict[str, KeyResult] = field(default_factory=dict)
    new_dirs: list[Path] = field(default_factory=list)
    records: int = 0
    bytes: int = 0
    fsyncs: int = 0


def keys_on_disk(root: Path) -> list[str]:
    """Keys with a log or a state file under ``root``, sorted (a blocking
    directory walk). A key with only a state file is one whose removal was cut
    short."""
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in files:
            for suffix in (LOG_SUFFIX, STATE_SUFFIX):
                if name.endswith(suffix) and not name.startswith("."):
                    key = (rel / name[: -len(suffix)]).as_posix()
                    with contextlib.suppress(ValueError):
                        check_key(key)
                        found.add(key)
    return sorted(found)


def scan(root: Path) -> dict[str, int]:
    """The size of every log under ``root`` (created if missing); stale temp files
    (of a state replacement a crash cut short) removed."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for key in keys_on_disk(root):
        with contextlib.suppress(FileNotFoundError):
            sizes[key] = log_path(root, key).stat().st_size
    for tmp in root.rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return sizes


def log_path(root: Path, key: str) -> Path:
    return root.joinpath(key + LOG_SUFFIX)


def state_path(root: Path, key: str) -> Path:
    return root.joinpath(key + STATE_SUFFIX)


def commit_key(root: Path, known_dirs: set[Path], key: str, path: Path, ops: list[Op],
           res: KeyResult, chunk: Chunk) -> None:
    """Apply one key's operations in order. ``res.size`` is kept at the size known
    to be fsynced, which is what a failure rolls back to."""
    fd = -1
    dirty = False

    def sync() -> None:
        nonlocal dirty
        os.fsync(fd)
        chunk.fsyncs += 1
        dirty = False
        res.size = os.fstat(fd).st_size

    try:
        for op in ops:
            if op.what == "append":
                if fd < 0:
                    ensure_dir(root, known_dirs, path.parent, chunk)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                 0o600)
                    res.dirent |= res.size is None
                rec = encode_record(op.kind, op.data, op.level)
                write_all(fd, rec)
                dirty = True
                chunk.records += 1
                chunk.bytes += len(rec)
            elif op.what == "state":
                if dirty:  # the log before the state that may refer to it
                    sync()
                ensure_dir(root, known_dirs, path.parent, chunk)
                atomic_write(state_path(root, key), op.data)
                res.dirent = True
            else:  # remove
                if fd >= 0:
                    os.close(fd)
                    fd, dirty = -1, False
                for p in (path, state_path(root, key)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
                res.size, res.dirent = None, True
        if dirty:
            sync()
    finally:
        if fd >= 0:
            os.close(fd)

def ensure_dir(root: Path, known_dirs: set[Path], d: Path, chunk: Chunk) -> None:
    """Create ``d`` and missing parents below root; their parents need an fsync."""
    if d in known_dirs:
        return
    missing = []
    p = d
    while p != root and not p.is_dir():
        missing.append(p)
        p = p.parent
    for m in reversed(missing):
        with contextlib.suppress(FileExistsError):
            m.mkdir(mode=0o700)
        chunk.new_dirs.append(m.parent)
    known_dirs.add(d)


class LogReader:
    """Iterates a log's intact records; at the end, cuts a bad tail (truncate + fsync).
    ``good`` is the length kept, ``cut`` the bytes cut, ``exists`` whether the file was there."""

    def __init__(self, key: str, path: Path) -> None:
        self.key, self.path = key, path
        self.good = self.cut = 0
        self.exists = False

    def __iter__(self) -> Iterator[Record]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        self.exists = True
        with f:
            size = os.fstat(f.fileno()).st_size
            while True:
                rec, problem = read_one(f, size - self.good)
                if rec is None:
                    break
                self.good += HEADER.size + rec[1]
                yield rec[0]
        if problem is not None:
            log.warning("spool %s: %s at offset %d; cutting %d bytes", tag(self.key),
                        problem, self.good, size - self.good)
            rollback(self.path, self.good, strict=True)
            self.cut = size - self.good


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def rollback(path: Path, size: int | None, *, strict: bool = False) -> bool:
    """Truncate ``path`` to ``size`` (0 if None) and fsync it. False if that failed
    (raises instead with ``strict``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size or 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        if strict:
            raise
        log.exception("spool: could not truncate a log back to %s bytes", size)
        return False


def fsync_dirs(dirs: list[Path]) -> dict[Path, BaseException]:
    """Worker thread: fsync each directory; the failures."""
    errors: dict[Path, BaseException] = {}
    for d in dirs:
        try:
            fsync_dir(d)
        except FileNotFoundError:
            pass  # removed since; nothing to make durable
        except OSError as e:
            errors[d] = e
    return errors
