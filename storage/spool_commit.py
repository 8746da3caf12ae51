"""The spool's committer: group commit of every session's operations.

:class:`GroupCommit` is the half of :class:`storage.spool.Spool` that runs as its
committer task (:meth:`GroupCommit.run`): it takes every operation queued since the
last round, commits each key's in worker threads (:mod:`storage.spool_files`),
fsyncs the directories whose entries changed, then wakes the round's waiters with
their true outcome. The spool's module docstring gives the guarantees; this module
holds the rounds. State is the spool's own (set up by ``Spool.__init__``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from storage.fsutil import os_error_text
from storage.spool_errors import SpoolClosed, SpoolError
from storage.spool_files import (
    Chunk,
    KeyResult,
    Op,
    commit_key,
    fsync_dirs,
    log_path,
    rollback,
    scan,
)
from storage.spool_format import tag

log = logging.getLogger("telemetry.spool")


@dataclass(eq=False)
class Round:
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


class GroupCommit:
    """The committer of :class:`storage.spool.Spool` (its base class)."""

    root: Path
    _interval: float
    _threads: int
    _limiter: trio.CapacityLimiter
    _sizes: dict[str, int]
    _log_bytes: int
    _reserved: int
    _round: Round
    _inflight: Round | None
    _work: trio.Event
    _running: bool
    _closed: bool
    _broken: set[str]
    _unsynced: set[Path]
    _known_dirs: set[Path]
    _counts: dict[str, Any]

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
                rnd, self._round, self._work = self._round, Round(), trio.Event()
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

    async def _commit(self, rnd: Round) -> None:
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

    def _finish_round(self, rnd: Round, by_key: dict[str, list[Op]],
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

    def _log_path(self, key: str) -> Path:
        return log_path(self.root, key)

    def _scan(self) -> dict[str, int]:
        """Worker thread: sizes of every log; stale temp files removed."""
        return scan(self.root)
