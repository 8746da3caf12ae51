"""The durable spool: one shared, append-only, checksummed segment log for every
live session.

A session actor acknowledges a batch (202) only after :meth:`Spool.append` has
returned, and ``append`` returns only once the record is written *and fsynced*.
Appends from all sessions are committed together by one committer task
(:meth:`Spool.run`, started in the root nursery): group commit, into one shared
segment file, so a round costs one fsync whatever the number of sessions in it.

How a round is committed, and the files it writes, are described in
:mod:`storage.spool_files`; the index, per-key order, removal and compaction in
:mod:`storage.spool_index`; the record format in :mod:`storage.spool_format`. Logs
of the earlier layout (one ``org/session.log`` per session) are read where they
are, as the start of their key's log, and deleted with the key.

Errors: an OSError while committing a key's operation fails only that key's
operations in the round (their waiters get :class:`SpoolError`); what it wrote is
cut back, so a record that was refused cannot hide a later one. If even the cut
fails the segment is abandoned (later records go to a new one) and the key is
marked broken: every later append to it raises SpoolError until it is removed. A
failed fsync fails every key with records in it since its last fsync (the segment
is cut back to that fsync; broken keys if that fails too). Keys are
``org/session`` and join to a patient in the Core API, so neither a key nor a path
built from one is ever put in an exception message or a log line: a
:class:`SpoolError` names its key by the same ``k_`` tag as the spool's log lines
and carries the key itself as the attribute ``key``, and an OSError is described
by errno and strerror only (:func:`storage.fsutil.os_error_text`).

Cancellation: a cancelled ``append`` / ``set_state`` / ``remove`` raises
``Cancelled``; if its round had not started the operation is dropped, otherwise it
may have been done. When ``run`` is cancelled, a round already in its worker
thread finishes (threads are not abandoned) and its waiters get the true outcome;
every other waiter gets :class:`SpoolClosed`. No waiter is ever told "durable" for
an operation that was not fsynced.

Budget: ``bytes_used`` is what the spool holds on disk (every segment, live or
not, old-layout logs) plus the reservations of queued appends; an append that
would take it past ``max_bytes`` raises :class:`SpoolFull`. Compaction (between
rounds) keeps the dead part at most about the live part plus one segment. A
compaction step and :meth:`Spool.aread` exclude each other (a step moves records
and deletes segments); appends wait for neither.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from storage.fsutil import fsync_dir
from storage.journal import Record
from storage.spool_commit import GroupCommit, Round
from storage.spool_errors import SpoolClosed, SpoolError, SpoolFull
from storage.spool_files import LogReader, Op, keys_on_disk, log_path, state_path
from storage.spool_format import (
    HEADER,
    MAGIC,
    SEG_PREFIX,
    check_append,
    check_key,
    encode_record,
    read_seg_one,
    tag,
)
from storage.spool_index import SHIFT, Index, scan

# The errors live in storage.spool_errors; HEADER, MAGIC, encode_record and fsync_dir
# are re-exported for the tests and bench/bench_spool.py.
__all__ = ["HEADER", "MAGIC", "Record", "Spool", "SpoolClosed", "SpoolError", "SpoolFull",
           "encode_record", "fsync_dir"]

log = logging.getLogger("telemetry.spool")


class Spool(GroupCommit):
    """One shared, append-only segment log under root for every session,
    checksummed records, group-commit fsync (the committer is
    :class:`storage.spool_commit.GroupCommit`). See the module docstring for
    behaviour. A :class:`storage.journal.Journal`.

    ``segment_bytes``: size at which the active segment is closed and a new one
    started (default: 1/16 of the budget, within 64 KiB .. 64 MiB).
    ``fsync_threads``: the size of the spool's own limiter when none is given
    (a round is one thread call; reads at start-up may run in parallel)."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 2 * 1024**3,
        fsync_interval_s: float = 0.005,
        limiter: trio.CapacityLimiter | None = None,
        fsync_threads: int = 4,
        compress_level: int = 1,
        segment_bytes: int | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes if segment_bytes is not None \
            else min(64 * 1024**2, max(64 * 1024, max_bytes // 16))
        self._interval = fsync_interval_s
        self._limiter = limiter if limiter is not None else \
            trio.CapacityLimiter(max(1, fsync_threads))
        self._level = compress_level
        self._index: Index | None = None
        self._reserved = 0
        self._round = Round()
        self._inflight: Round | None = None
        self._work = trio.Event()
        self._running = False
        self._closed = False
        self._broken: set[str] = set()
        self._reading: set[str] = set()
        self._upkeep_busy: trio.Event | None = None  # set: a compaction step in flight
        self._unsynced: set[Path] = set()  # directories whose entries are not yet fsynced
        self._known_dirs: set[Path] = set()
        self._counts = dict(records=0, bytes=0, rounds=0, fsyncs=0, failed=0,
                            torn_tails=0, torn_bytes=0, corrupt_states=0,
                            compacted_bytes=0, segments_deleted=0)

    # -- properties ------------------------------------------------------------------

    @property
    def bytes_used(self) -> int:
        """Bytes on disk (segments, old-layout logs) plus bytes reserved by queued
        appends."""
        return (self._index.disk_bytes if self._index is not None else 0) + self._reserved

    @property
    def torn_tails(self) -> int:
        return self._counts["torn_tails"]

    def stats(self) -> dict[str, Any]:
        c = dict(self._counts)
        c["records_per_round"] = c["records"] / c["rounds"] if c["rounds"] else 0.0
        c["fsyncs_per_round"] = c["fsyncs"] / c["rounds"] if c["rounds"] else 0.0
        c["bytes_used"] = self.bytes_used
        idx = self._index
        c["sessions"] = idx.count_logs() if idx is not None else 0
        c["segments"] = len(idx.segs) if idx is not None else 0
        c["live_bytes"] = idx.live_bytes if idx is not None else 0
        return c

    # -- operations ------------------------------------------------------------------

    async def append(self, key: str, kind: int, payload: bytes, *, compress: bool = True) -> None:
        """Append one record to ``key``'s log; returns once it is fsynced.

        ``compress=False`` stores the payload as is: worth it for data zlib barely
        shrinks, such as raw pose batches (-11% for ~0.5 ms of CPU each; see the bench).

        Raises ValueError (bad key, kind outside 0..65535, payload over 64 MiB),
        :class:`SpoolFull` (budget; nothing queued), :class:`SpoolClosed`
        (committer not running) or :class:`SpoolError` (the commit failed; the
        record is not durable and the log is back at its previous length)."""
        data = check_append(key, kind, payload)
        need = HEADER.size + SEG_PREFIX.size + len(key) + len(data)
        if not self._running:
            raise SpoolClosed("spool committer is not running")
        if self.bytes_used + need > self.max_bytes:
            raise SpoolFull(f"spool budget of {self.max_bytes} bytes reached")
        await self._submit(Op(key, "append", kind, data, need, self._level if compress else 0))

    async def set_state(self, key: str, state: dict[str, Any]) -> None:
        """Replace ``key``'s state file atomically (temp, fsync, rename, directory
        fsync), committed in order with the key's appends (the segment is fsynced
        first if they are in the same round). Errors and cancellation as for
        :meth:`append`; TypeError/ValueError if ``state`` is not a JSON object."""
        check_key(key)
        if not isinstance(state, dict):
            raise TypeError("state must be a dict")
        data = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
        await self._submit(Op(key, "state", data=data))

    async def remove(self, key: str) -> None:
        """Remove ``key``'s log (a tombstone in the segment log, fsynced; its
        segments are deleted once nothing in them is live) and delete its state
        file (and its old-layout log), in order with its queued operations.
        Errors and cancellation as for :meth:`append`."""
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
        states, _logs = keys_on_disk(self.root)
        return sorted(set(states) | set(self._view().log_keys()))

    def log_keys(self) -> list[str]:
        """Keys with a log (records in the segments, or an old-layout log), sorted.
        On a spool whose committer is not running this is a read-only scan of the
        disk, safe while another process writes to it (blocking: for start-up and
        tests)."""
        return self._view().log_keys()

    def iter_records(self, key: str) -> Iterator[Record]:
        """``key``'s intact records in order (see :meth:`read`)."""
        yield from self.read(key)

    def read(self, key: str) -> list[Record]:
        """All intact records of ``key``, in order; [] if it has no log (blocking
        reads: for start-up before the committer runs, and tests; with the committer
        running use :meth:`aread`, which waits for a compaction step in flight).
        A torn or corrupt tail of an old-layout log is cut
        off (truncate + fsync) and counted; segment tails are cut by :meth:`run`.
        Never raises for corruption (reading stops there); OSError for I/O
        failures; RuntimeError if the key has queued operations or is being read."""
        self._begin_read(key)
        try:
            reader, positions, paths = self._read_plan(key)
            records = read_key(reader, positions, paths)
            self._account(key, reader)
            return records
        finally:
            self._reading.discard(key)

    async def aread(self, key: str) -> list[Record]:
        """:meth:`read` in a worker thread under the limiter, safe while the committer
        runs: it first waits for a compaction step in flight to end (no new one
        starts while a key is being read), so it never reads a segment a step is
        moving records out of and deleting. Appends to other keys go on meanwhile.
        Cancelled while waiting: raises ``Cancelled``, nothing read. Not abandoned
        once reading: the read, and any cut, completes before Cancelled is raised."""
        self._begin_read(key)
        try:
            while (busy := self._upkeep_busy) is not None:
                await busy.wait()
            reader, positions, paths = self._read_plan(key)
            records = await trio.to_thread.run_sync(read_key, reader, positions, paths,
                                                     limiter=self._limiter)
            self._account(key, reader)
            return records
        finally:
            self._reading.discard(key)

    def _view(self) -> Index:
        """The index: the committer's, or else a read-only scan of the disk."""
        if self._index is None:
            idx = scan(self.root, cut=False)
            _states, logs = keys_on_disk(self.root)
            for key in logs:
                ki = idx.keys.get(key)
                if ki is not None and ki.gen > 0:
                    continue  # removed; start-up deletes it
                with contextlib.suppress(FileNotFoundError):
                    idx.set_legacy(key, log_path(self.root, key).stat().st_size)
            if self._running or self._closed:
                return idx
            self._index = idx
        return self._index

    def _read_plan(self, key: str) -> tuple[LogReader | None, list[int], dict[int, Path]]:
        idx = self._view()
        ki = idx.keys.get(key)
        if ki is None:
            return None, [], {}
        reader = LogReader(key, log_path(self.root, key)) if ki.legacy is not None else None
        paths = {sid: idx.segs[sid].path for sid in ki.segs}
        return reader, list(ki.pos), paths

    def _begin_read(self, key: str) -> None:
        check_key(key)
        if key in self._reading or any(op.key == key for op in self._pending_ops()):
            raise RuntimeError(f"spool key {tag(key)} is busy")
        self._reading.add(key)

    def _account(self, key: str, reader: LogReader | None) -> None:
        if reader is None:
            return
        if reader.cut:
            self._counts["torn_tails"] += 1
            self._counts["torn_bytes"] += reader.cut
        if self._index is not None:
            self._index.set_legacy(key, reader.good if reader.exists else None)

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

    def _state_path(self, key: str) -> Path:
        return state_path(self.root, key)


def read_key(reader: LogReader | None, positions: list[int],
             paths: dict[int, Path]) -> list[Record]:
    """Blocking: a key's old-layout log, then its records at ``positions`` in the
    segments. A record that no longer reads back intact (bit rot since start-up)
    ends the log there, as a corrupt tail would."""
    records = list(reader) if reader is not None else []
    files: dict[int, Any] = {}
    try:
        for p in positions:
            sid, off = p >> SHIFT, p & ((1 << SHIFT) - 1)
            f = files.get(sid)
            if f is None:
                f = files[sid] = open(paths[sid], "rb")  # noqa: SIM115 - closed below
            f.seek(off)
            rec, problem = read_seg_one(f, 1 << 62)
            if rec is None or rec.tomb:
                log.error("spool segment %d: %s at offset %d; log read up to there", sid,
                          problem or "tombstone", off)
                break
            try:
                records.append(rec.record())
            except ValueError:
                log.error("spool segment %d: bad compressed payload at offset %d", sid, off)
                break
    finally:
        for f in files.values():
            f.close()
    return records
