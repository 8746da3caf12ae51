"""The durable spool: one append-only, checksummed log file per live session.

A session actor acknowledges a batch (202) only after :meth:`Spool.append` has
returned, and ``append`` returns only once the record is written *and fsynced*.
Appends from all sessions are committed together by one committer task
(:meth:`Spool.run`, started in the root nursery): group commit.

How a round is committed, and the files it writes, are described in
:mod:`storage.spool_files`; the record format in :mod:`storage.spool_format`.

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

import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from storage.fsutil import fsync_dir, os_error_text
from storage.journal import Record
from storage.spool_files import (
    Chunk,
    KeyResult,
    LogReader,
    Op,
    commit_key,
    fsync_dirs,
    keys_on_disk,
    log_path,
    rollback,
    scan,
    state_path,
)
from storage.spool_format import HEADER, MAGIC, MAX_PAYLOAD, check_key, encode_record, tag

# HEADER, MAGIC, encode_record and fsync_dir: for the tests and bench/bench_spool.py.
__all__ = ["HEADER", "MAGIC", "Record", "Spool", "SpoolClosed", "SpoolError", "SpoolFull",
           "encode_record", "fsync_dir"]

log = logging.getLogger("telemetry.spool")



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


@dataclass(eq=False)
class _Round:
    ops: list[Op] = field(default_factory=list)
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
        by_key: dict[str, list[Op]] = {}
        for op in ops:
            by_key.setdefault(op.key, []).append(op)
        if not by_key:  # everything in it was cancelled before the round began
            rnd.done.set()
            return
        items = [(k, v, self._sizes.get(k)) for k, v in by_key.items()]
        n = min(self._threads, max(1, len(items) // 8))
        chunks: list[Chunk | None] = [None] * n
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
                            fsync_dirs, sorted(self._unsynced), limiter=self._limiter)
                        self._unsynced = set(errors)
                    dirs_done = True
                except Exception:
                    log.exception("spool directory fsync failed")
            self._reserved -= sum(op.need for op in ops)
            self._finish_round(rnd, by_key, chunks, dirs_done)

    def _collect_dirs(self, chunks: list[Chunk | None]) -> None:
        for ch in chunks:
            if ch is not None:
                self._unsynced.update(ch.new_dirs)
                self._unsynced.update(
                    self._log_path(k).parent for k, r in ch.keys.items() if r.dirent)

    def _finish_round(self, rnd: _Round, by_key: dict[str, list[Op]],
                      chunks: list[Chunk | None], dirs_done: bool) -> None:
        """Apply what the threads did and wake the round's waiters (no checkpoint).
        A key succeeds only if its thread committed it and its directory is synced."""
        c = self._counts
        c["rounds"] += 1
        results: dict[str, KeyResult] = {}
        for ch in chunks:
            if ch is not None:
                results.update(ch.keys)
                c["records"] += ch.records
                c["bytes"] += ch.bytes
                c["fsyncs"] += ch.fsyncs
        for key in by_key:
            r = results.get(key)
            if r is None:  # its thread never ran (cancelled waiting for the limiter, or a bug)
                rnd.errors[key] = SpoolClosed(f"commit of {tag(key)} did not run", key=key)
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
                rnd.errors[key] = SpoolError(f"directory of {tag(key)} {what} fsynced",
                                             key=key)
        c["failed"] += len(rnd.errors)
        rnd.done.set()

    def _commit_keys(self, items: list[tuple[str, list[Op], int | None]]) -> Chunk:
        """Worker thread: commit a chunk of keys. Never raises for one key's failure."""
        chunk = Chunk()
        for key, ops, start in items:
            path = self._log_path(key)
            res = chunk.keys[key] = KeyResult(start)
            try:
                self._commit_key(key, path, ops, res, chunk)
            except Exception as e:
                res.broken = not rollback(path, res.size)
                log.error("spool commit of %s failed: %s %s%s", tag(key), type(e).__name__,
                          getattr(e, "strerror", ""), " (log broken)" if res.broken else "")
                res.error = SpoolError(f"commit of {tag(key)} failed: {os_error_text(e)}",
                                       key=key)
                res.error.__cause__ = e
        return chunk

    def _commit_key(self, key: str, path: Path, ops: list[Op], res: KeyResult,
                    chunk: Chunk) -> None:
        """One key's operations, in order (a method, so that a test can make one
        spool's commits fail)."""
        commit_key(self.root, self._known_dirs, key, path, ops, res, chunk)

    # -- operations ------------------------------------------------------------------

    async def append(self, key: str, kind: int, payload: bytes, *, compress: bool = True) -> None:
        """Append one record to ``key``'s log; returns once it is fsynced.

        ``compress=False`` stores the payload as is: worth it for data zlib barely
        shrinks, such as raw pose batches (-11% for ~0.5 ms of CPU each; see the bench).

        Raises ValueError (bad key, kind outside 0..65535, payload over 64 MiB),
        :class:`SpoolFull` (budget; nothing queued), :class:`SpoolClosed`
        (committer not running) or :class:`SpoolError` (the commit failed; the
        record is not durable and the log is back at its previous length)."""
        check_key(key)
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
        await self._submit(Op(key, "append", kind, data, need, self._level if compress else 0))

    async def set_state(self, key: str, state: dict[str, Any]) -> None:
        """Replace ``key``'s state file atomically (temp, fsync, rename, directory
        fsync), committed in order with the key's appends (the log is fsynced
        first). Errors and cancellation as for :meth:`append`; TypeError/ValueError
        if ``state`` is not a JSON object."""
        check_key(key)
        if not isinstance(state, dict):
            raise TypeError("state must be a dict")
        data = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
        await self._submit(Op(key, "state", data=data))

    async def remove(self, key: str) -> None:
        """Delete ``key``'s log and state file (in order with its queued appends)
        and fsync the directory. Errors and cancellation as for :meth:`append`."""
        check_key(key)
        await self._submit(Op(key, "remove"))

    async def _submit(self, op: Op) -> None:
        if not self._running:
            raise SpoolClosed("spool committer is not running")
        if op.key in self._reading:
            raise RuntimeError(f"spool key {tag(op.key)} is being read")
        if op.what == "append" and op.key in self._broken:
            raise SpoolError(f"log of {tag(op.key)} is broken after a failed write",
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
        return keys_on_disk(self.root)

    def iter_records(self, key: str) -> Iterator[Record]:
        """Stream ``key``'s intact records in order (blocking reads: for start-up).
        On reaching the end, a torn or corrupt tail is cut off (truncate + fsync)
        and counted; nothing is cut if the iteration is abandoned early. Never
        raises for corruption; OSError for I/O failures; RuntimeError if the key
        has queued operations or is being read."""
        self._begin_read(key)
        try:
            reader = LogReader(key, self._log_path(key))
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
            reader = LogReader(key, self._log_path(key))
            records = await trio.to_thread.run_sync(list, reader, limiter=self._limiter)
            self._account(key, reader)
            return records
        finally:
            self._reading.discard(key)

    def _begin_read(self, key: str) -> None:
        check_key(key)
        if key in self._reading or any(op.key == key for op in self._pending_ops()):
            raise RuntimeError(f"spool key {tag(key)} is busy")
        self._reading.add(key)

    def _account(self, key: str, reader: LogReader) -> None:
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
        check_key(key)
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
        log.error("spool %s: state file does not parse; ignored", tag(key))
        self._counts["corrupt_states"] += 1
        return None

    # -- internals ---------------------------------------------------------------------

    def _pending_ops(self) -> list[Op]:
        return self._round.ops + (self._inflight.ops if self._inflight else [])

    def _log_path(self, key: str) -> Path:
        return log_path(self.root, key)

    def _state_path(self, key: str) -> Path:
        return state_path(self.root, key)

    def _scan(self) -> dict[str, int]:
        """Worker thread: sizes of every log; stale temp files removed."""
        return scan(self.root)
