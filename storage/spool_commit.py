"""The spool's committer: group commit of every session's operations.

:class:`GroupCommit` is the half of :class:`storage.spool.Spool` that runs as its
committer task (:meth:`GroupCommit.run`): it takes every operation queued since the
last round, commits them in one worker-thread call (:mod:`storage.spool_files`:
records of every key into the shared segment, one fsync), then wakes the round's
waiters with their true outcome, applies the round to the index
(:mod:`storage.spool_index`), and does one compaction step if one is due. The
spool's module docstring gives the guarantees. State is the spool's own (set up by
``Spool.__init__``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from storage.fsutil import fsync_dir, os_error_text
from storage.spool_errors import SpoolClosed, SpoolError
from storage.spool_files import (
    KeyResult,
    Op,
    Writer,
    close_segment,
    commit_key,
    fsync_dirs,
    keys_on_disk,
    log_path,
    remove_temp_files,
    unlink_all,
)
from storage.spool_format import encode_seg_record, read_seg_one, tag
from storage.spool_index import SHIFT, Index, Upkeep, scan

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
    max_bytes: int
    segment_bytes: int
    _interval: float
    _limiter: trio.CapacityLimiter
    _index: Index | None
    _reserved: int
    _round: Round
    _inflight: Round | None
    _work: trio.Event
    _running: bool
    _closed: bool
    _broken: set[str]
    _reading: set[str]
    _upkeep_busy: trio.Event | None
    _unsynced: set[Path]
    _known_dirs: set[Path]
    _counts: dict[str, Any]

    # -- committer -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer. Scans the spool (segments, torn tails cut, old-layout logs,
        stale temp files), calls ``started()``, then commits rounds until cancelled;
        see the module docstring for what waiters get on cancellation. Never
        returns normally."""
        if self._running or self._closed:
            raise RuntimeError("Spool.run may be started once")
        self._index = await trio.to_thread.run_sync(self._scan, limiter=self._limiter)
        self._counts["torn_tails"] += self._index.torn_tails
        self._counts["torn_bytes"] += self._index.torn_bytes
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
                await self._upkeep()
        finally:
            self._running, self._closed = False, True
            closed = SpoolClosed("spool committer stopped")
            for rnd in (self._inflight, self._round):
                if rnd is not None and not rnd.done.is_set():
                    rnd.fail(closed)
            self._reserved = 0
            if self._index is not None and self._index.active is not None:
                close_segment(self._index.active)

    async def _commit(self, rnd: Round) -> None:
        ops = [op for op in rnd.ops if not op.cancelled]
        by_key: dict[str, list[Op]] = {}
        for op in ops:
            by_key.setdefault(op.key, []).append(op)
        if not by_key:  # everything in it was cancelled before the round began
            rnd.done.set()
            return
        idx = self._index
        assert idx is not None
        w = Writer(idx.seg_dir, idx.active, idx.next_sid, self.segment_bytes)
        for key in by_key:
            ki = idx.keys.get(key)
            w.results[key] = KeyResult(ki.gen, ki.next_seq, ki.legacy is not None) if ki \
                else KeyResult(0, 0, False)
        ran = False
        try:
            await trio.to_thread.run_sync(self._commit_round, by_key, w, limiter=self._limiter)
            ran = True
        except Exception:  # a bug: fail what is not known durable, keep committing
            log.exception("spool commit round failed")
        finally:
            self._reserved -= sum(op.need for op in ops)
            self._finish_round(rnd, by_key, w, ran)

    def _commit_round(self, by_key: dict[str, list[Op]], w: Writer) -> None:
        """Worker thread: every key's operations, one fsync, the directories."""
        for key, ops in by_key.items():
            res = w.results[key]
            res.save()
            try:
                self._commit_key(key, ops, res, w)
            except Exception as e:
                self._key_failed(key, res, e, w)
        if w.dirty:
            try:
                w.sync()
            except OSError as e:
                log.error("spool: segment fsync failed: %s", os_error_text(e))
        for key in w.broken_keys:  # a cut-back failed: what its segment holds is unknown
            if key in w.results:
                w.results[key].broken = True
        if self._unsynced or w.new_dirs:
            dirs = sorted(self._unsynced | w.new_dirs)
            self._unsynced = set(fsync_dirs(dirs))
            w.fsyncs += len(dirs)

    def _key_failed(self, key: str, res: KeyResult, e: Exception, w: Writer) -> None:
        res.broken = key in w.broken_keys
        log.error("spool commit of %s failed: %s %s%s", tag(key), type(e).__name__,
                  getattr(e, "strerror", ""), " (log broken)" if res.broken else "")
        res.fail(self._spool_error(key, e), restore=False)
        w.after_sync = [(k, p) for k, p in w.after_sync if k != key]

    @staticmethod
    def _spool_error(key: str, e: BaseException) -> BaseException:
        if isinstance(e, SpoolError):
            return e
        err = SpoolError(f"commit of {tag(key)} failed: {os_error_text(e)}", key=key)
        err.__cause__ = e
        return err

    def _commit_key(self, key: str, ops: list[Op], res: KeyResult, w: Writer) -> None:
        """One key's operations, in order (a method, so that a test can make one
        spool's commits fail)."""
        commit_key(self.root, self._known_dirs, key, ops, res, w)

    def _finish_round(self, rnd: Round, by_key: dict[str, list[Op]], w: Writer,
                      ran: bool) -> None:
        """Apply what the thread did and wake the round's waiters (no checkpoint).
        A key succeeds only if it was committed, fsynced, and its directories are."""
        idx = self._index
        assert idx is not None
        c = self._counts
        c["rounds"] += 1
        c["records"] += w.records
        c["bytes"] += w.bytes
        c["fsyncs"] += w.fsyncs
        idx.active, idx.next_sid = w.active, max(idx.next_sid, w.next_sid)
        idx.written([*w.created, *w.seen.values()], w.touched)
        for key in by_key:
            res = w.results[key]
            idx.apply(key, res)
            if not ran:
                rnd.errors[key] = SpoolClosed(f"commit of {tag(key)} did not run", key=key)
                continue
            if res.broken:
                self._broken.add(key)
            if res.error is not None:
                rnd.errors[key] = self._spool_error(key, res.error)
            elif self._unsynced:  # a new segment or state file may not be found
                rnd.errors[key] = SpoolError(f"directory of {tag(key)} could not be fsynced",
                                             key=key)
        c["failed"] += len(rnd.errors)
        rnd.done.set()

    # -- compaction --------------------------------------------------------------------

    async def _upkeep(self) -> None:
        """Compaction steps (:meth:`Index.upkeep`), each in a worker thread: one
        if operations are waiting for the next round, else while one is due (at
        most 64 before the committer looks for work again). A failed step is
        logged and tried again after the next round."""
        for _ in range(64):
            if not await self._upkeep_step() or self._work.is_set():
                return

    async def _upkeep_step(self) -> bool:
        """One step; False if there was none or it failed.

        Reads and steps exclude each other, since a step moves records and deletes
        the segments it emptied: a step is planned only while nothing is being read
        (``_reading``), and while one is in flight ``_upkeep_busy`` is set, which
        :meth:`storage.spool.Spool.aread` waits on before it takes its positions (it
        then reads them from the index this step updated). The event is set once the
        index is updated, also if the step fails or the committer is cancelled (the
        thread is never abandoned, so that is after it ended). Appends never wait."""
        idx = self._index
        assert idx is not None
        plan = idx.upkeep(self.max_bytes, bool(self._reading))
        if plan is None:
            return False
        busy = self._upkeep_busy = trio.Event()
        try:
            ok = True
            w = Writer(idx.seg_dir, idx.active, idx.next_sid, self.segment_bytes)
            try:
                await trio.to_thread.run_sync(self._upkeep_thread, plan, w,
                                              limiter=self._limiter)
            except Exception as e:
                log.error("spool compaction failed: %s", os_error_text(e))
                ok = False
                plan.moved.clear()
                plan.carried.clear()
                plan.deleted.clear()
            idx.active, idx.next_sid = w.active, max(idx.next_sid, w.next_sid)
            idx.written([*w.created, *w.seen.values()], w.touched)
            idx.apply_upkeep(plan)
            self._counts["compacted_bytes"] += sum(sz for m in plan.moved.values()
                                                   for *_, sz in m)
            self._counts["segments_deleted"] += len(plan.deleted)
            return ok
        finally:  # no checkpoint since the index was updated
            self._upkeep_busy = None
            busy.set()

    def _upkeep_thread(self, plan: Upkeep, w: Writer) -> None:
        """Worker thread: copy, copy tombstones forward, fsync, delete."""
        if plan.close_active and w.active is not None:
            close_segment(w.active)
            w.active = None
        if plan.copy_from is not None:
            src = self._index.segs[plan.copy_from]  # type: ignore[union-attr]
            with open(src.path, "rb") as f:
                for key, positions in plan.copy:
                    moved = plan.moved.setdefault(key, [])
                    for p in positions:
                        f.seek(p & ((1 << SHIFT) - 1))
                        rec, problem = read_seg_one(f, src.size - (p & ((1 << SHIFT) - 1)))
                        if rec is None or rec.key != key:
                            raise OSError(f"segment record unreadable: {problem}")
                        f.seek(p & ((1 << SHIFT) - 1))
                        raw = f.read(rec.size)
                        sid, off = w.write(key, raw)
                        moved.append((sid, off, len(raw)))
        carried = []
        for key, gen in plan.carry:
            sid, _ = w.write(key, encode_seg_record(key, gen, 0, 0, b"", tomb=True))
            carried.append((key, gen, sid))
        if w.dirty:
            w.sync()
        plan.carried = carried
        if w.new_dirs:
            fsync_dir(w.seg_dir)
        unlink_all([s.path for s in plan.delete], set())
        plan.deleted = [s.sid for s in plan.delete]
        fsync_dir(w.seg_dir)

    # -- start-up ----------------------------------------------------------------------

    def _scan(self) -> Index:
        """Worker thread: the index; old-layout logs; stale temp files removed."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        seg_dir = self.root / ".segments"
        if not seg_dir.is_dir():
            seg_dir.mkdir(mode=0o700)
            fsync_dir(self.root)
        idx = scan(self.root, cut=True)
        _states, logs = keys_on_disk(self.root)
        for key in logs:
            path = log_path(self.root, key)
            ki = idx.keys.get(key)
            if ki is not None and ki.gen > 0:  # its removal was cut short: finish it
                unlink_all([path], self._unsynced)
                continue
            try:
                idx.set_legacy(key, path.stat().st_size)
            except FileNotFoundError:
                continue
        remove_temp_files(self.root)
        return idx

