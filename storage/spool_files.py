"""The spool's file side: what its worker threads do to the disk.

Writing records into the shared segment files, replacing and deleting state files,
cutting a failed write back, reading an old per-session log, and the
fsync-before-acknowledge primitives. Everything here blocks: the spool
(:mod:`storage.spool`) calls it in worker threads. Every system call goes through
this module's ``os`` (a failure-injection test replaces it).

Files under ``root``, for a key ``"org-a/sess-1"`` (1-4 safe path segments)::

    .segments/000000000017.seg  the shared log: every key's records, appended in order
    org-a/sess-1.state.json     the finalisation state (set_state), replaced atomically
    org-a/.sess-1.state.json.tmp   only ever seen after a crash; removed on start-up
    org-a/sess-1.log            a log of the earlier per-session layout (read, never written)

Commit round (the committer, one worker-thread call): take every operation queued
since the last round; for each key, in queue order, append records (and
tombstones) to the active segment, replace or delete the state file; then fsync
the segment files written (one fsync for the whole round, whatever the number of
sessions), run the deletions that had to wait for a tombstone to be durable, fsync
the directories whose entries changed, and wake every waiter of the round. A state
replacement is ordered after its key's earlier appends by fsyncing the segment
first (a second fsync in that round; states are written a few times per session).
Rounds start as soon as there is work, at most once per ``fsync_interval_s``.
A segment is rolled (a new file) once it reaches ``segment_bytes``; index and
compaction: :mod:`storage.spool_index`.
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
from storage.spool_format import HEADER, check_key, encode_seg_record, read_one, tag

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
    """What a round did to one key, applied to the index on the event loop. It
    always tells what is in the files: a failed fsync puts it back as it was at
    the key's last fsync (:meth:`fail`)."""

    gen: int  # the key's generation after the round
    next_seq: int  # its next sequence number (never reused, even after a failure)
    legacy: bool  # it still has a log of the old layout
    written: list[tuple[int, int, int]] = field(default_factory=list)  # live (sid, off, size)
    removed: int = 0  # removals done in the round (live records before them are dead)
    tombs: list[tuple[int, int]] = field(default_factory=list)  # (sid, gen)
    error: BaseException | None = None
    broken: bool = False
    _saved: tuple[int, bool, list[tuple[int, int, int]], int, list[tuple[int, int]]] | None = None

    def save(self) -> None:
        """Remember the current result as durable."""
        self._saved = (self.gen, self.legacy, list(self.written), self.removed, list(self.tombs))

    def fail(self, e: BaseException, *, restore: bool) -> None:
        if self.error is None:
            self.error = e
        if restore and self._saved is not None:
            self.gen, self.legacy, written, self.removed, tombs = self._saved
            self.written, self.tombs = list(written), list(tombs)


@dataclass
class SegmentFile:
    """One segment file; ``fd`` is open while it is written to."""

    sid: int
    path: Path
    size: int = 0  # bytes of intact records
    synced: int = 0  # bytes known fsynced
    fd: int = -1


@dataclass
class Writer:
    """The writing side of the segments during a round (or a compaction), in one
    worker thread. ``active`` is kept by the spool between rounds; ``results``
    are the round's :class:`KeyResult` (kept true on a failed fsync)."""

    seg_dir: Path
    active: SegmentFile | None
    next_sid: int
    segment_bytes: int
    results: dict[str, KeyResult] = field(default_factory=dict)
    dirty: dict[int, SegmentFile] = field(default_factory=dict)  # written since their fsync
    unsynced_keys: set[str] = field(default_factory=set)
    new_dirs: set[Path] = field(default_factory=set)  # directories whose entries changed
    created: list[SegmentFile] = field(default_factory=list)
    after_sync: list[tuple[str, list[Path]]] = field(default_factory=list)  # deferred unlinks
    broken_keys: set[str] = field(default_factory=set)
    seen: dict[int, SegmentFile] = field(default_factory=dict)  # segments written to
    touched: set[tuple[str, int]] = field(default_factory=set)  # (key, sid) written to
    records: int = 0
    bytes: int = 0
    fsyncs: int = 0

    def write(self, key: str, data: bytes) -> tuple[int, int]:
        """Append ``data`` to the active segment (a new one first if there is none
        or it is full); (segment id, offset). A failed write is cut back; if even
        that fails the segment is abandoned and the key is in ``broken_keys``."""
        seg = self.active
        if seg is None or (seg.size >= self.segment_bytes and not self.dirty):
            seg = self._roll()  # rolled between fsyncs only: one fsync covers a round
        off = seg.size
        self.dirty[seg.sid] = self.seen[seg.sid] = seg
        self.unsynced_keys.add(key)
        self.touched.add((key, seg.sid))
        try:
            write_all(seg.fd, data)
        except BaseException:
            try:
                os.ftruncate(seg.fd, off)
            except OSError:
                log.exception("spool: could not cut a segment back after a failed write")
                self.active = None  # bytes of unknown shape at its end: no more after them
                self.broken_keys.add(key)
            raise
        seg.size += len(data)
        self.bytes += len(data)
        return seg.sid, off

    def _roll(self) -> SegmentFile:
        old, self.active = self.active, None
        if old is not None and old.sid not in self.dirty:
            close_segment(old)  # else closed once fsynced
        path = self.seg_dir / f"{self.next_sid:012d}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        seg = SegmentFile(self.next_sid, path, fd=fd)
        self.next_sid += 1
        self.active = seg
        self.created.append(seg)
        self.new_dirs.add(self.seg_dir)
        return seg

    def sync(self) -> None:
        """fsync every segment written since its last fsync, then do the deletions
        that waited for it. On failure every key written since is failed and put
        back (:meth:`KeyResult.fail`), each segment cut back to its fsynced size
        (or abandoned, its keys broken, if that fails too), and the error raised."""
        try:
            for seg in list(self.dirty.values()):
                os.fsync(seg.fd)
                self.fsyncs += 1
        except OSError as e:
            cut = all([self._cut_to_synced(seg) for seg in self.dirty.values()])
            for k in self.unsynced_keys:
                if not cut:
                    self.broken_keys.add(k)
                if k in self.results:
                    self.results[k].fail(e, restore=True)
            self.after_sync = [(k, p) for k, p in self.after_sync if k not in self.unsynced_keys]
            self._settle()
            raise
        for seg in self.dirty.values():
            seg.synced = seg.size
        for k in self.unsynced_keys:
            if k in self.results:
                self.results[k].save()
        self._settle()
        for _key, paths in self.after_sync:
            unlink_all(paths, self.new_dirs)
        self.after_sync.clear()

    def _cut_to_synced(self, seg: SegmentFile) -> bool:
        try:
            os.ftruncate(seg.fd, seg.synced)
            os.fsync(seg.fd)
            seg.size = seg.synced
            return True
        except OSError:
            log.exception("spool: could not cut a segment back after a failed fsync")
            if self.active is seg:
                self.active = None
            return False

    def _settle(self) -> None:
        for seg in self.dirty.values():
            if seg is not self.active:
                close_segment(seg)
        self.dirty.clear()
        self.unsynced_keys.clear()


def close_segment(seg: SegmentFile) -> None:
    if seg.fd >= 0:
        fd, seg.fd = seg.fd, -1
        os.close(fd)


def unlink_all(paths: list[Path], new_dirs: set[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            new_dirs.add(p.parent)


def commit_key(root: Path, known_dirs: set[Path], key: str, ops: list[Op], res: KeyResult,
               w: Writer) -> None:
    """Apply one key's operations in order; raises at the first that fails (the
    ones before it stay done: ``res`` says so)."""
    for op in ops:
        if op.what == "append":
            rec = encode_seg_record(key, res.gen, res.next_seq, op.kind, op.data, op.level)
            res.next_seq += 1
            sid, off = w.write(key, rec)
            res.written.append((sid, off, len(rec)))
            w.records += 1
        elif op.what == "state":
            if key in w.unsynced_keys:  # the log before the state that may refer to it
                w.sync()
            path = state_path(root, key)
            ensure_dir(root, known_dirs, path.parent, w.new_dirs)
            atomic_write(path, op.data)
            w.fsyncs += 1
            w.new_dirs.add(path.parent)
        else:  # remove: a tombstone, then the files once it is durable
            sid, _off = w.write(key, encode_seg_record(key, res.gen, 0, 0, b"", tomb=True))
            res.tombs.append((sid, res.gen))
            res.written.clear()
            res.removed += 1
            res.gen, res.next_seq = res.gen + 1, 0
            paths = [state_path(root, key)] + ([log_path(root, key)] if res.legacy else [])
            res.legacy = False
            w.after_sync.append((key, paths))
            if op is not ops[-1]:  # later operations of the key must find them gone
                w.sync()


def keys_on_disk(root: Path) -> tuple[list[str], list[str]]:
    """(keys with a state file, keys with a log of the old layout) under ``root``,
    each sorted (a blocking directory walk; the segment directory is skipped)."""
    states: set[str] = set()
    logs: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for name in files:
            for suffix, found in ((LOG_SUFFIX, logs), (STATE_SUFFIX, states)):
                if name.endswith(suffix) and not name.startswith("."):
                    key = (rel / name[: -len(suffix)]).as_posix()
                    with contextlib.suppress(ValueError):
                        check_key(key)
                        found.add(key)
    return sorted(states), sorted(logs)


def remove_temp_files(root: Path) -> None:
    """Stale temp files of state replacements a crash cut short."""
    for tmp in root.rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def log_path(root: Path, key: str) -> Path:
    return root.joinpath(key + LOG_SUFFIX)


def state_path(root: Path, key: str) -> Path:
    return root.joinpath(key + STATE_SUFFIX)


def ensure_dir(root: Path, known_dirs: set[Path], d: Path, new_dirs: set[Path]) -> None:
    """Create ``d`` and missing parents below root; their parents need an fsync."""
    if d in known_dirs or d == root:
        return
    missing = []
    p = d
    while p != root and not p.is_dir():
        missing.append(p)
        p = p.parent
    for m in reversed(missing):
        with contextlib.suppress(FileExistsError):
            m.mkdir(mode=0o700)
        new_dirs.add(m.parent)
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
