"""The durable spool: one append-only, checksummed log file per live session.

A session actor acknowledges a batch (202) only after :meth:`Spool.append` has
returned, and ``append`` returns only once the record is written *and fsynced*.
Appends from all sessions are committed together by one committer task
(:meth:`Spool.run`, started in the root nursery): group commit.

Files under ``root``, for a key ``"org-a/sess-1"`` (1-4 safe path segments)::

    org-a/sess-1.log           the records, appended in order
    org-a/sess-1.state.json    the finalisation state (set_state), replaced atomically
    org-a/.sess-1.state.json.tmp   only ever seen after a crash; removed on start-up

Record format (all integers little-endian; header 16 bytes)::

    offset size  field
    0      4     magic  b"RXS1"
    4      4     u32    stored payload length L (after compression)
    8      2     u16    kind (the caller's record type)
    10     2     u16    flags: bit 0 = payload is zlib-compressed (zlib.compress format);
                        other bits must be 0
    12     4     u32    CRC-32 (zlib.crc32, ISO-HDLC polynomial) of bytes 0..11 then
                        the L stored payload bytes
    16     L            stored payload

CRC-32C would be the usual choice but needs a third-party package; the stdlib CRC-32
is as strong for this purpose and costs ~6 us per 16 KB here. A payload of 64 bytes
or more is stored compressed (zlib, level ``compress_level``, default 1; 0 = never)
if that makes it smaller, unless ``append(..., compress=False)``. Compression runs in
the committer's worker threads, not on the event loop.

Reading (:meth:`Spool.read`) stops at the first record that is short, has a wrong
magic, an impossible length, unknown flags, a bad CRC or an undecompressable
payload: the file is truncated to the last good record and fsynced, and the cut is
counted (``torn_tails``). A crash can only damage bytes written after the log's
last fsync, and no append returns before its fsync, so nothing acknowledged is cut.
The converse does not hold: a record whose append failed or was in flight at a
crash may survive intact, so whoever replays a log must tolerate records that were
never acknowledged (the session sequencer drops duplicates by sequence number).

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

Errors: an OSError while committing a key fails only that key's operations in the
round (their waiters get :class:`SpoolError`); its log is truncated back to the
last committed size and fsynced, so a record that was refused cannot hide a later
one. If even that fails the key is marked broken and every later append to it
raises SpoolError. Other keys in the round are unaffected. Keys are ``org/session``
and join to a patient in the Core API, so neither a key nor a path built from one
is ever put in an exception message or a log line: a :class:`SpoolError` names
its key by the same ``k_`` tag as the spool's log lines and carries the key itself
as the attribute ``key``, and an OSError is described by errno and strerror only
(:func:`storage.fsutil.os_error_text`).

Cancellation: a cancelled ``append`` / ``set_state`` / ``remove`` raises
``Cancelled``; if its round had not started the operation is dropped, otherwise it
may have been done. When ``run`` is cancelled, a round already in a worker thread
finishes (threads are not abandoned), its directory fsync runs in a shielded scope
(bounded at 5 s), and its waiters get the true outcome; every other waiter gets
:class:`SpoolClosed`. No waiter is ever told "durable" for an operation that was
not fsynced.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from storage.fsutil import fsync_dir, os_error_text
from storage.journal import Record

__all__ = ["Record", "Spool", "SpoolClosed", "SpoolError", "SpoolFull"]

log = logging.getLogger("telemetry.spool")

MAGIC: Final = b"RXS1"
HEADER: Final = struct.Struct("<4sIHHI")  # magic, length, kind, flags, crc
FLAG_ZLIB: Final = 0x1
MAX_PAYLOAD: Final = 64 * 1024 * 1024
_SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_SUFFIXES: Final = (".log", ".json", ".tmp")
_LOG, _STATE = ".log", ".state.json"


class SpoolError(Exception):
    """A spool operation failed; nothing it was asked to make durable is durable.

    ``key`` is the key it concerns (None if it concerns no one key). It is kept out
    of ``str()``: the message may be logged, with its traceback, and keys join to
    a patient."""

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key


class SpoolFull(SpoolError):
    """The disk budget would be exceeded; nothing was queued (answer 503 + Retry-After)."""


class SpoolClosed(SpoolError):
    """The committer is not running (not started yet, or stopped)."""


def encode_record(kind: int, payload: bytes, compress_level: int = 1) -> bytes:
    """One record, header and stored payload (compressed if that is smaller)."""
    flags, stored = 0, payload
    if compress_level > 0 and len(payload) >= 64:
        packed = zlib.compress(payload, compress_level)
        if len(packed) < len(payload):
            flags, stored = FLAG_ZLIB, packed
    head = HEADER.pack(MAGIC, len(stored), kind, flags, 0)[:12]
    crc = zlib.crc32(stored, zlib.crc32(head))
    return head + struct.pack("<I", crc) + stored


def _check_key(key: str) -> list[str]:
    parts = key.split("/") if isinstance(key, str) else []
    if not 1 <= len(parts) <= 4 or any(
        not _SEGMENT.fullmatch(p) or p.endswith(_RESERVED_SUFFIXES) for p in parts
    ):
        raise ValueError(
            "bad spool key: want 1-4 '/'-separated segments of A-Z a-z 0-9 . _ - "
            "(not starting with . _ -, not ending in .log/.json/.tmp)"
        )
    return parts


@dataclass(eq=False)
class _Op:
    key: str
    what: str  # "append" | "state" | "remove"
    kind: int = 0
    data: bytes = b""
    need: int = 0  # bytes reserved against the budget
    level: int = 0  # zlib level for an append; 0 = store as is
    cancelled: bool = False


@dataclass(eq=False)
class _Round:
    ops: list[_Op] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def outcome(self, key: str) -> None:
        """Raise the key's error, as a fresh exception per waiter (several may share it)."""
        err = self.errors.get(key)
        if err is not None:
            # copy.copy, not type(err)(*err.args): attributes such as ``key`` come along
            raise copy.copy(err) from err.__cause__

    def fail(self, exc: BaseException) -> None:
        for op in self.ops:
            self.errors.setdefault(op.key, exc)
        self.done.set()


@dataclass
class _KeyResult:
    size: int | None  # log size on disk after the round; None = no log
    error: BaseException | None = None
    dirent: bool = False  # a directory entry changed: the directory needs an fsync
    broken: bool = False


@dataclass
class _Chunk:
    keys: dict[str, _KeyResult] = field(default_factory=dict)
    new_dirs: list[Path] = field(default_factory=list)
    records: int = 0
    bytes: int = 0
    fsyncs: int = 0


class Spool:
    """One append-only log file per session under root, checksummed records,
    group-commit fsync. See the module docstring for format and behaviour."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 2 * 1024**3,
        fsync_interval_s: float = 0.005,
        limiter: trio.CapacityLimiter | None = None,
        fsync_threads: int = 4,
        compress_level: int = 1,
    ) -> None:
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self._interval = fsync_interval_s
        self._threads = max(1, fsync_threads)
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(self._threads)
        self._level = compress_level
        self._sizes: dict[str, int] = {}  # committed log size per key
        self._log_bytes = 0
        self._reserved = 0
        self._round = _Round()
        self._inflight: _Round | None = None
        self._work = trio.Event()
        self._running = False
        self._closed = False
        self._broken: set[str] = set()
        self._reading: set[str] = set()
        self._unsynced: set[Path] = set()  # directories whose entries are not yet fsynced
        self._known_dirs: set[Path] = set()
        self._counts = dict(records=0, bytes=0, rounds=0, fsyncs=0, failed=0,
                            torn_tails=0, torn_bytes=0, corrupt_states=0)

    # -- properties ------------------------------------------------------------------

    @property
    def bytes_used(self) -> int:
        """Committed log bytes plus bytes reserved by queued appends."""
        return self._log_bytes + self._reserved

    @property
    def torn_tails(self) -> int:
        return self._counts["torn_tails"]

    def stats(self) -> dict[str, Any]:
        c = dict(self._counts)
        c["records_per_round"] = c["records"] / c["rounds"] if c["rounds"] else 0.0
        c["bytes_used"] = self.bytes_used
        c["sessions"] = len(self._sizes)
        return c

    # -- committer -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer. Scans the spool (sizes, stale temp files), calls
        ``started()``, then commits rounds until cancelled; see the module
        docstring for what waiters get on cancellation. Never returns normally."""
        if self._running or self._closed:
            raise RuntimeError("Spool.run may be started once")
        sizes = await trio.to_thread.run_sync(self._scan, limiter=self._limiter)
        self._sizes.update(sizes)
        self._log_bytes = sum(self._sizes.values())
        self._running = True
        task_status.started()
        last = -float("inf")
        try:
            while True:
                await self._work.wait()
                await trio.sleep_until(last + self._interval)
                rnd, self._round, self._work = self._round, _Round(), trio.Event()
                last = trio.current_time()
                self._inflight = rnd
                await self._commit(rnd)
                self._inflight = None
        finally:
            self._running, self._closed = False, True
            closed = SpoolClosed("spool committer stopped")
            for rnd in (self._inflight, self._round):
                if rnd is not None and not rnd.done.is_set():
                    rnd.fail(closed)
            self._reserved = 0

    async def _commit(self, rnd: _Round) -> None:
        ops = [op for op in rnd.ops if not op.cancelled]
        by_key: dict[str, list[_Op]] = {}
        for op in ops:
            by_key.setdefault(op.key, []).append(op)
        if not by_key:  # everything in it was cancelled before the round began
            rnd.done.set()
            return
        items = [(k, v, self._sizes.get(k)) for k, v in by_key.items()]
        n = min(self._threads, max(1, len(items) // 8))
        chunks: list[_Chunk | None] = [None] * n
        dirs_done = False

        async def part(i: int) -> None:
            chunks[i] = await trio.to_thread.run_sync(
                self._commit_keys, items[i::n], limiter=self._limiter)

        try:
            if n == 1:
                await part(0)
            else:
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(part, i)
        except Exception:  # a bug: fail what is not known durable, keep committing
            log.exception("spool commit round failed")
        finally:
            # Directory entries of what the threads did, shielded (and bounded) so a
            # round stopped by shutdown still gives its waiters a "durable" if true.
            self._collect_dirs(chunks)
            with trio.move_on_after(5) as scope:
                scope.shield = True
                try:
                    if self._unsynced:
                        errors = await trio.to_thread.run_sync(
                            _fsync_dirs, sorted(self._unsynced), limiter=self._limiter)
                        self._unsynced = set(errors)
                    dirs_done = True
                except Exception:
                    log.exception("spool directory fsync failed")
            self._reserved -= sum(op.need for op in ops)
            self._finish_round(rnd, by_key, chunks, dirs_done)

    def _collect_dirs(self, chunks: list[_Chunk | None]) -> None:
        for ch in chunks:
            if ch is not None:
                self._unsynced.update(ch.new_dirs)
                self._unsynced.update(
                    self._log_path(k).parent for k, r in ch.keys.items() if r.dirent)

    def _finish_round(self, rnd: _Round, by_key: dict[str, list[_Op]],
                      chunks: list[_Chunk | None], dirs_done: bool) -> None:
        """Apply what the threads did and wake the round's waiters (no checkpoint).
        A key succeeds only if its thread committed it and its directory is synced."""
        c = self._counts
        c["rounds"] += 1
        results: dict[str, _KeyResult] = {}
        for ch in chunks:
            if ch is not None:
                results.update(ch.keys)
                c["records"] += ch.records
                c["bytes"] += ch.bytes
                c["fsyncs"] += ch.fsyncs
        for key in by_key:
            r = results.get(key)
            if r is None:  # its thread never ran (cancelled waiting for the limiter, or a bug)
                rnd.errors[key] = SpoolClosed(f"commit of {_tag(key)} did not run", key=key)
                continue
            self._log_bytes += (r.size or 0) - self._sizes.pop(key, 0)
            if r.size is not None:
                self._sizes[key] = r.size
            if r.broken:
                self._broken.add(key)
            if r.error is not None:
                rnd.errors[key] = r.error
            elif self._log_path(key).parent in self._unsynced:
                what = "was not" if not dirs_done else "could not be"
                rnd.errors[key] = SpoolError(f"directory of {_tag(key)} {what} fsynced",
                                             key=key)
        c["failed"] += len(rnd.errors)
        rnd.done.set()

    def _commit_keys(self, items: list[tuple[str, list[_Op], int | None]]) -> _Chunk:
        """Worker thread: commit a chunk of keys. Never raises for one key's failure."""
        chunk = _Chunk()
        for key, ops, start in items:
            path = self._log_path(key)
            res = chunk.keys[key] = _KeyResult(start)
            try:
                self._commit_key(key, path, ops, res, chunk)
            except Exception as e:
                res.broken = not _rollback(path, res.size)
                log.error("spool commit of %s failed: %s %s%s", _tag(key), type(e).__name__,
                          getattr(e, "strerror", ""), " (log broken)" if res.broken else "")
                res.error = SpoolError(f"commit of {_tag(key)} failed: {os_error_text(e)}",
                                       key=key)
                res.error.__cause__ = e
        return chunk

    def _commit_key(self, key: str, path: Path, ops: list[_Op], res: _KeyResult,
                    chunk: _Chunk) -> None:
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
                        self._ensure_dir(path.parent, chunk)
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                     0o600)
                        res.dirent |= res.size is None
                    rec = encode_record(op.kind, op.data, op.level)
                    _write_all(fd, rec)
                    dirty = True
                    chunk.records += 1
                    chunk.bytes += len(rec)
                elif op.what == "state":
                    if dirty:  # the log before the state that may refer to it
                        sync()
                    self._ensure_dir(path.parent, chunk)
                    _atomic_write(self._state_path(key), op.data)
                    res.dirent = True
                else:  # remove
                    if fd >= 0:
                        os.close(fd)
                        fd, dirty = -1, False
                    for p in (path, self._state_path(key)):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(p)
                    res.size, res.dirent = None, True
            if dirty:
                sync()
        finally:
            if fd >= 0:
                os.close(fd)

    def _ensure_dir(self, d: Path, chunk: _Chunk) -> None:
        """Create ``d`` and missing parents below root; their parents need an fsync."""
        if d in self._known_dirs:
            return
        missing = []
        p = d
        while p != self.root and not p.is_dir():
            missing.append(p)
            p = p.parent
        for m in reversed(missing):
            with contextlib.suppress(FileExistsError):
                m.mkdir(mode=0o700)
            chunk.new_dirs.append(m.parent)
        self._known_dirs.add(d)

    # -- operations ------------------------------------------------------------------

    async def append(self, key: str, kind: int, payload: bytes, *, compress: bool = True) -> None:
        """Append one record to ``key``'s log; returns once it is fsynced.

        ``compress=False`` stores the payload as is: worth it for data zlib barely
        shrinks, such as raw pose batches (-11% for ~0.5 ms of CPU each; see the bench).

        Raises ValueError (bad key, kind outside 0..65535, payload over 64 MiB),
        :class:`SpoolFull` (budget; nothing queued), :class:`SpoolClosed`
        (committer not running) or :class:`SpoolError` (the commit failed; the
        record is not durable and the log is back at its previous length)."""
        _check_key(key)
        if not 0 <= kind <= 0xFFFF:
            raise ValueError(f"record kind {kind} outside 0..65535")
        data = bytes(payload)
        if len(data) > MAX_PAYLOAD:
            raise ValueError(f"record payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
        need = HEADER.size + len(data)
        if not self._running:
            raise SpoolClosed("spool committer is not running")
        if self.bytes_used + need > self.max_bytes:
            raise SpoolFull(f"spool budget of {self.max_bytes} bytes reached")
        await self._submit(_Op(key, "append", kind, data, need, self._level if compress else 0))

    async def set_state(self, key: str, state: dict[str, Any]) -> None:
        """Replace ``key``'s state file atomically (temp, fsync, rename, directory
        fsync), committed in order with the key's appends (the log is fsynced
        first). Errors and cancellation as for :meth:`append`; TypeError/ValueError
        if ``state`` is not a JSON object."""
        _check_key(key)
        if not isinstance(state, dict):
            raise TypeError("state must be a dict")
        data = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
        await self._submit(_Op(key, "state", data=data))

    async def remove(self, key: str) -> None:
        """Delete ``key``'s log and state file (in order with its queued appends)
        and fsync the directory. Errors and cancellation as for :meth:`append`."""
        _check_key(key)
        await self._submit(_Op(key, "remove"))

    async def _submit(self, op: _Op) -> None:
        if not self._running:
            raise SpoolClosed("spool committer is not running")
        if op.key in self._reading:
            raise RuntimeError(f"spool key {_tag(op.key)} is being read")
        if op.what == "append" and op.key in self._broken:
            raise SpoolError(f"log of {_tag(op.key)} is broken after a failed write",
                             key=op.key)
        if op.what == "remove":
            self._broken.discard(op.key)
        rnd = self._round
        self._reserved += op.need
        rnd.ops.append(op)
        self._work.set()
        try:
            await rnd.done.wait()
        except BaseException:
            if rnd is self._round and not op.cancelled:  # not taken yet: drop it
                op.cancelled = True
                self._reserved -= op.need
            raise
        rnd.outcome(op.key)

    # -- reading (start-up) ------------------------------------------------------------

    def keys(self) -> list[str]:
        """Keys with a log or a state file on disk, sorted (blocking directory walk;
        meant for start-up). A key with only a state file is one whose
        :meth:`remove` was cut short: finish it."""
        found: set[str] = set()
        for dirpath, _dirs, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            for name in files:
                for suffix in (_LOG, _STATE):
                    if name.endswith(suffix) and not name.startswith("."):
                        key = (rel / name[: -len(suffix)]).as_posix()
                        with contextlib.suppress(ValueError):
                            _check_key(key)
                            found.add(key)
        return sorted(found)

    def iter_records(self, key: str) -> Iterator[Record]:
        """Stream ``key``'s intact records in order (blocking reads: for start-up).
        On reaching the end, a torn or corrupt tail is cut off (truncate + fsync)
        and counted; nothing is cut if the iteration is abandoned early. Never
        raises for corruption; OSError for I/O failures; RuntimeError if the key
        has queued operations or is being read."""
        self._begin_read(key)
        try:
            reader = _LogReader(key, self._log_path(key))
            yield from reader
            self._account(key, reader)
        finally:
            self._reading.discard(key)

    def read(self, key: str) -> list[Record]:
        """All intact records of ``key`` (see :meth:`iter_records`); [] if no log."""
        return list(self.iter_records(key))

    async def aread(self, key: str) -> list[Record]:
        """:meth:`read` in a worker thread under the limiter. Not abandoned on
        cancellation: the read, and any cut, completes before Cancelled is raised."""
        self._begin_read(key)
        try:
            reader = _LogReader(key, self._log_path(key))
            records = await trio.to_thread.run_sync(list, reader, limiter=self._limiter)
            self._account(key, reader)
            return records
        finally:
            self._reading.discard(key)

    def _begin_read(self, key: str) -> None:
        _check_key(key)
        if key in self._reading or any(op.key == key for op in self._pending_ops()):
            raise RuntimeError(f"spool key {_tag(key)} is busy")
        self._reading.add(key)

    def _account(self, key: str, reader: _LogReader) -> None:
        if reader.cut:
            self._counts["torn_tails"] += 1
            self._counts["torn_bytes"] += reader.cut
        if reader.exists:
            self._log_bytes += reader.good - self._sizes.get(key, 0)
            self._sizes[key] = reader.good

    # -- the Journal interface (storage.journal) ---------------------------------------

    async def state(self, key: str) -> dict[str, Any] | None:
        """:meth:`get_state`, on the event loop (one small file read)."""
        return self.get_state(key)

    async def replay(self, key: str) -> list[Record]:
        """:meth:`aread`."""
        return await self.aread(key)

    async def sessions(self) -> list[str]:
        """:meth:`keys` in a worker thread (a directory walk)."""
        return await trio.to_thread.run_sync(self.keys)

    def get_state(self, key: str) -> dict[str, Any] | None:
        """``key``'s state, or None if it has none. A state file that does not parse
        (it cannot be torn: it is renamed into place) is logged, counted
        (``corrupt_states``) and read as None: every finalisation step is
        idempotent, so starting it over is safe."""
        _check_key(key)
        try:
            raw = self._state_path(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(raw)
            if isinstance(state, dict):
                return state
        except ValueError:
            pass
        log.error("spool %s: state file does not parse; ignored", _tag(key))
        self._counts["corrupt_states"] += 1
        return None

    # -- internals ---------------------------------------------------------------------

    def _pending_ops(self) -> list[_Op]:
        return self._round.ops + (self._inflight.ops if self._inflight else [])

    def _log_path(self, key: str) -> Path:
        return self.root.joinpath(key + _LOG)

    def _state_path(self, key: str) -> Path:
        return self.root.joinpath(key + _STATE)

    def _scan(self) -> dict[str, int]:
        """Worker thread: sizes of every log; stale temp files removed."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        sizes: dict[str, int] = {}
        for key in self.keys():
            with contextlib.suppress(FileNotFoundError):
                sizes[key] = self._log_path(key).stat().st_size
        for tmp in self.root.rglob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return sizes


class _LogReader:
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
                rec, problem = _read_one(f, size - self.good)
                if rec is None:
                    break
                self.good += HEADER.size + rec[1]
                yield rec[0]
        if problem is not None:
            log.warning("spool %s: %s at offset %d; cutting %d bytes", _tag(self.key),
                        problem, self.good, size - self.good)
            _rollback(self.path, self.good, strict=True)
            self.cut = size - self.good


def _read_one(f: Any, left: int) -> tuple[tuple[Record, int] | None, str | None]:
    """The next record and its stored length, or (None, problem; None at a clean end)."""
    head = f.read(HEADER.size)
    if not head:
        return None, None
    if len(head) < HEADER.size:
        return None, "torn header"
    magic, length, kind, flags, crc = HEADER.unpack(head)
    if magic != MAGIC:
        return None, "bad magic"
    if length > left - HEADER.size or length > MAX_PAYLOAD:
        return None, "torn payload"
    body = f.read(length)
    if len(body) < length:
        return None, "torn payload"
    if zlib.crc32(body, zlib.crc32(head[:12])) != crc:
        return None, "bad crc"
    if flags & ~FLAG_ZLIB:
        return None, "unknown flags"
    if flags & FLAG_ZLIB:
        try:
            body = zlib.decompress(body)
        except zlib.error:
            return None, "bad compressed payload"
    return (Record(kind, body), length), None


def _tag(key: str) -> str:
    """What log lines carry instead of a key: keys join to a patient in the Core API."""
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _rollback(path: Path, size: int | None, *, strict: bool = False) -> bool:
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


def _fsync_dirs(dirs: list[Path]) -> dict[Path, BaseException]:
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
