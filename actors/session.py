"""The session actor: one Trio task per live exercise session.

The actor owns everything about its session: the batch sequencer, tracking
statistics, the repetition engine and the compressed replay being written. The
HTTP handlers talk to it only through its admission methods (:mod:`actors.admission`:
synchronous, never block: they accept, deduplicate or refuse a batch and queue it in
the bounded mailbox) and :meth:`SessionActor.request_end`.

Lifecycle: ``run`` applies queued batches in sequence order (in chunks:
:mod:`actors.chunks`) until the session is
ended by the client, an operator, idle timeout, maximum duration or shutdown; then
it records the end durably (with a spool: retried until the disk takes it), drains
the mailbox (everything acknowledged is applied), finalises (blob written and
verified, summary event published; storage failures retried with backoff) and sets
:attr:`finished`. Between the end request and the durable end mark the session is
*ending*: new batches get :class:`~domain.errors.SessionEnding` (503, retry),
because a crash then would bring it back live; once the mark is durable they get
:class:`~domain.errors.SessionEnded` (409), which a restart does not undo
(``docs/durability.md``). Admission (the handler side) is :mod:`actors.admission`.

Errors: an exception while applying a batch is a bug; the actor logs it, stops
computing metrics, keeps appending the acknowledged frames to the replay, and
finalises with end reason ``actor_error``. No exception escapes ``run`` except
``trio.Cancelled``: a cancelled actor (hard stop after the shutdown deadline) does
not finalise. With a spool, a finalisation that raises (a bug, never a storage
failure: those are retried) leaves :attr:`summary` None and the session on disk at
its step, for the next start to resume.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import trio

from actors.admission import Admission, TurnOrder
from actors.backoff import Backoff
from actors.chunks import CHUNK_BATCHES, CHUNK_DELAY_S, ChunkedApply
from actors.durable import POSE, START, encode_claims, session_key
from actors.finalise import Finalisation, finalise, record_end
from actors.limits import ActorLimits
from actors.media_tracker import MediaTracker
from actors.pose_stats import PoseStats
from actors.reps import RepEngine
from actors.sequencer import Sequencer, Verdict
from actors.summary import build_summary
from actors.summary import iso_time as _iso
from domain.claims import SessionClaims
from domain.errors import SessionMoving
from domain.pose_batch import PoseBatch
from storage.blobs import BlobStore
from storage.bus import Bus
from storage.journal import Journal
from storage.ownership import SessionMoved
from storage.replay import ReplayWriter

log = logging.getLogger("telemetry.actor")

END_REASONS = ("client_end", "admin", "idle_timeout", "max_duration", "shutdown", "actor_error")


class SessionActor(Admission, ChunkedApply):
    def __init__(
        self,
        claims: SessionClaims,
        *,
        settings: ActorLimits,
        store: BlobStore,
        bus: Bus,
        log_id: str,
        journal: Journal | None = None,
    ) -> None:
        self.claims = claims
        self.settings = settings
        self.store = store
        self.bus = bus
        self.journal = journal
        self.key = session_key(claims.org_id, claims.session_id)
        self.spill_path = Path(settings.data_dir) / "replay" / f"{self.key}.part"
        self.start_written = False
        self._start_lock = trio.Lock()
        self._handover = False
        # Fleet mode: another instance took the session over (a fenced write was
        # refused, or the sweep saw its ownership record change): stop, finalise nothing.
        self.moved = False
        self._admitting = 0
        self._persisting: dict[int, int] = {}
        self._judging = TurnOrder()
        self._admissions_done = trio.Event()
        self._accepted = 0  # batches the sequencer took (see Admission._mark)
        self._draining = False
        self.org_id = claims.org_id
        self.session_id = claims.session_id
        self.log_id = log_id
        self._tx, self._rx = trio.open_memory_channel[PoseBatch](settings.mailbox_size)
        self._seq = Sequencer(window=settings.reorder_window)
        self._held: dict[int, PoseBatch] = {}  # out-of-order batches awaiting their turn
        self._gap_since: float | None = None
        # in-order batches in the replay whose metrics are not computed yet:
        # (t_ms, frames as stored), and when the oldest of them became ready
        self._pending: list[tuple[Any, Any]] = []
        self._pending_since: float | None = None
        self.chunk_batches = CHUNK_BATCHES
        self.chunk_delay_s = CHUNK_DELAY_S
        self.stats = PoseStats()
        # Pose state starts with the first pose batch (its space and image size); a
        # session may also carry only media events (analytics consent without biometric).
        self.space: str | None = None
        self.reps: RepEngine | None = None
        self.replay: ReplayWriter | None = None
        self.media = MediaTracker()
        now = trio.current_time()
        self.started_mono = now
        self.last_batch_mono = now
        self.started_wall = time.time()
        self.last_batch_wall = self.started_wall
        self.t0_wall: float | None = None  # wall time of client t_ms == 0 (estimated)
        self.duplicates = 0
        # Token bucket for batches per second (burst of two seconds' worth).
        self._rate = settings.max_batches_per_s
        self._tokens = 2 * settings.max_batches_per_s
        self._tokens_at = now
        self.end_reason: str | None = None
        self.error: str | None = None
        self.summary: dict[str, Any] | None = None
        self.finished = trio.Event()
        self._wake: trio.CancelScope | None = None
        # Pacing of the finalisation's retries; a repeated end call kicks it.
        self.backoff = Backoff()
        self._end_recorded = False

    def _start_pose(self, first: PoseBatch) -> None:
        ex = self.claims.exercise
        aspect = first.image_width / first.image_height if first.image_height else 1.0
        self.space = first.space
        self.reps = RepEngine(
            ex.kind, side=ex.side, space=first.space, aspect=aspect, target_reps=ex.target_reps
        )
        meta = {
            "exercise": ex.to_dict(),
            "image_width": first.image_width,
            "image_height": first.image_height,
        }
        kwargs: dict[str, Any] = {}
        if self.settings.blob_encoding:
            kwargs["encoding"] = self.settings.blob_encoding
        # The compressed replay goes to disk as it grows, so memory per live session
        # stays flat; a file left by an earlier process is stale (recovery rebuilds
        # the replay from the spool's records).
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self.spill_path.unlink(missing_ok=True)
        self.replay = ReplayWriter(
            org_id=self.org_id, session_id=self.session_id, space=first.space, meta=meta,
            spill_path=self.spill_path, **kwargs,
        )

    def _touch(self, first_t_ms: int) -> None:
        self.last_batch_mono = trio.current_time()
        self.last_batch_wall = time.time()
        if self.t0_wall is None:
            # Client clocks count from the session start; the first message fixes the
            # offset to wall time, up to one network delay.
            self.t0_wall = self.last_batch_wall - first_t_ms / 1000.0

    # -- handler side: synchronous, no checkpoints ---------------------------------

    @property
    def ending(self) -> bool:
        return self.end_reason is not None

    @property
    def end_recorded(self) -> bool:
        """The end is durable (its mark is in the journal), so a restart cannot bring
        the session back live. Always true without a journal: nothing survives a
        restart there anyway."""
        return self._end_recorded or self.journal is None

    def mark_end_recorded(self) -> None:
        """Recovery found the end mark on disk, or :func:`record_end` wrote it."""
        self._end_recorded = True

    @property
    def holds_nothing(self) -> bool:
        """Nothing accepted, queued, being made durable or applied: safe to discard."""
        return (not self.start_written and not self._admitting and self.stats.frames == 0
                and self._tx.statistics().current_buffer_used == 0 and not self._held
                and not self._pending
                and not self.media.summaries())

    def discard(self) -> None:
        """Stop at once without finalising: the session never held any data here."""
        self._handover = True
        self.request_end("discarded")

    @property
    def handed_over(self) -> bool:
        """Stopped without finalising (shutdown in flush mode, or discarded)."""
        return self._handover

    def hand_over(self) -> None:
        """Stop without finalising (shutdown in flush mode; needs a journal)."""
        assert self.journal is not None
        self._handover = True
        self.request_end("shutdown")

    def lose(self) -> None:
        """Fleet mode: another instance owns the session now. Stop without finalising;
        batches and end calls here are told to retry (:class:`SessionMoving`)."""
        if not self.moved:
            log.info("session taken over by another instance", extra={"session": self.log_id})
        self.moved = True
        self._handover = True
        self.request_end("moved")

    async def persist(self, kind: int, body: bytes) -> None:
        """Make a record durable before it is acknowledged; no-op without a journal.

        The session's START record (its claims) goes first, once. Raises the
        journal's errors (``SpoolFull``, ``OSError``); cancellation propagates and the
        record may or may not be durable (it was not acknowledged either way)."""
        if self.journal is None:
            return
        try:
            if not self.start_written:
                async with self._start_lock:
                    if not self.start_written:
                        await self.journal.append(
                            self.key, START, encode_claims(self.claims, self.started_wall))
                        self.start_written = True
            # Pose floats barely compress (about 11% for 0.5 ms of CPU a batch, measured
            # by bench/bench_spool.py); media JSON does.
            await self.journal.append(self.key, kind, body, compress=kind != POSE)
        except SessionMoved:
            self.lose()
            raise SessionMoving() from None

    def restore_pose(self, batch: PoseBatch) -> None:
        """Recovery: re-apply a spooled batch through the live ordering logic. A
        record the sequencer calls a duplicate (two retries raced to the spool) is
        skipped, as it was live."""
        verdict, _ = self._seq.check(batch.seq, batch.first_t, batch.last_t)
        while verdict is Verdict.AHEAD_OF_WINDOW:
            # Acknowledged beyond the window: live, the gap timer had skipped the
            # missing batches before it came (skips are not journaled; a journaled
            # batch was acknowledged, so the gap is what was never received).
            self._skip_gap()
            verdict, _ = self._seq.check(batch.seq, batch.first_t, batch.last_t)
        if verdict is not Verdict.ACCEPT:
            return
        if self.space is None:
            self._start_pose(batch)
        self._seq.accept(batch.seq, batch.first_t, batch.last_t)
        self._accepted += 1
        self._take(batch)

    @property
    def skipped(self) -> int:
        return self._seq.skipped_count

    def request_end(self, reason: str) -> None:
        """Ask the actor to drain and finalise. Idempotent: the first reason wins. A
        repeated request cuts a finalisation's retry pause short (the client asking
        again is a good moment to try storage again)."""
        if self.end_reason is None:
            self.end_reason = reason
        if self._wake is not None:
            self._wake.cancel()
        self.backoff.kick()

    def queued(self) -> tuple[int, int]:
        """(batches in the mailbox, batches held out of order): what a metrics scrape
        reads, without applying the pending chunk as :meth:`snapshot` does."""
        return self._rx.statistics().current_buffer_used, len(self._held)

    def snapshot(self) -> dict[str, Any]:
        """The supervisor's admin view of this session (no personal data). Applies
        the pending chunk first, so the figures are those of every batch applied in
        order so far (a failure there ends the session as ``actor_error``, as it
        would in the actor's loop)."""
        self.apply_pending()
        return {
            "session_id": self.session_id,
            "org_id": self.org_id,
            "started_at": _iso(self.started_wall),
            "last_batch_at": _iso(self.last_batch_wall),
            "batches": self.stats.batches,
            "frames": self.stats.frames,
            "reps": self.reps.rep_count if self.reps is not None else None,
            "mailbox_depth": self._rx.statistics().current_buffer_used,
            "held_out_of_order": len(self._held),
            # what this session holds in memory now (the rest of its replay is on disk)
            "bytes_held": self.replay.memory_nbytes if self.replay is not None else 0,
            "replay_bytes": self.replay.nbytes if self.replay is not None else 0,
            "media_views": len(self.media.summaries()),
            "ending": self.end_reason,
        }

    # -- actor side -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._loop()
        except Exception as exc:  # a bug in the loop itself; finalise what we have
            log.exception("session actor loop failed", extra={"session": self.log_id})
            self.end_reason = "actor_error"
            self.error = f"{type(exc).__name__}: {exc}"
        if self._handover:
            # Shutdown in flush mode: everything acknowledged is in the spool, and the
            # next start carries the session on. Nothing to apply or finalise here.
            self.finished.set()
            return
        # A batch that passed its check before the end was asked for may still be
        # waiting on the spool's fsync; it was sent first, so it belongs in the session.
        # No timer: it waits on the same journal the end mark below is written to, so
        # the end could not be recorded any sooner (and a batch made durable must not
        # be refused after the end mark: a restart would find it before the mark).
        while self._admitting:
            self._admissions_done = trio.Event()
            await self._admissions_done.wait()
        self._draining = True
        try:
            # The end mark goes first: from here on the session refuses batches for
            # good (409), so a restart must find it ended too. Storage failures are
            # retried inside (the end call answers 503 meanwhile).
            if not self.end_recorded:
                assert self.journal is not None
                await record_end(self.journal, self.key, self.end_reason, self.log_id,
                                 self.backoff)
            self.mark_end_recorded()
            self._drain()
            self.summary = await finalise(self.finalisation())
            # Finalisation may have found the rep engine broken at its finish.
            self.end_reason = self.summary["end_reason"]
            self.error = self.summary["error"]
        except SessionMoved:
            # Fleet mode: another instance took the session over before this one's
            # end mark (or a finalisation step) was written; it finishes the session.
            self.lose()
        except Exception as exc:
            # A bug here must cost this session at most: the others run on. With a
            # spool the session stays on disk at its finalisation step, the next
            # start resumes it, and no summary is claimed meanwhile (the end call
            # answers 503, never a 200 for a blob that was not stored).
            log.exception("finalisation failed", extra={"session": self.log_id})
            self.error = f"finalisation failed: {type(exc).__name__}"
            if self.journal is None:
                self.summary = self.failure_summary()
        finally:
            self.finished.set()

    def finalisation(self) -> Finalisation:
        """What finalisation takes: this session as it stands, once drained."""
        return Finalisation(
            claims=self.claims, log_id=self.log_id, end_reason=self.end_reason,
            error=self.error, space=self.space, started_wall=self.started_wall,
            t0_wall=self.t0_wall, stats=self.stats, skipped=self.skipped,
            duplicates=self.duplicates, reps=self.reps, replay=self.replay, media=self.media,
            spill_path=self.spill_path, store=self.store, bus=self.bus, journal=self.journal,
            backoff=self.backoff, deadline_s=self.settings.shutdown_deadline_s,
        )

    def failure_summary(self) -> dict[str, Any]:
        """What the end call answers when an ephemeral (spool-less) finalisation
        failed (nothing published)."""
        summary = build_summary(
            claims=self.claims, space=self.space, started_wall=self.started_wall,
            ended_wall=time.time(), end_reason=self.end_reason or "actor_error", blob=None,
            stats=self.stats, skipped=self.skipped, duplicates=self.duplicates, reps=None,
            error=self.error,
        )
        summary["published"] = False
        return summary

    def _deadline(self) -> float:
        s = self.settings
        deadline = min(
            self.last_batch_mono + s.idle_timeout_s, self.started_mono + s.max_session_s
        )
        if self._gap_since is not None:
            deadline = min(deadline, self._gap_since + s.gap_timeout_s)
        if self._pending_since is not None:
            deadline = min(deadline, self._pending_since + self.chunk_delay_s)
        return deadline

    async def _loop(self) -> None:
        while self.end_reason is None:
            with trio.CancelScope(deadline=self._deadline()) as self._wake:
                # no local name: one would keep the last batch (16 KB of frames,
                # already recorded) alive while waiting for the next
                self._take(await self._rx.receive())
                continue
            self._wake = None
            if self.end_reason is not None:
                return
            now = trio.current_time()
            s = self.settings
            if now >= self.started_mono + s.max_session_s:
                self.end_reason = "max_duration"
            elif now >= self.last_batch_mono + s.idle_timeout_s:
                self.end_reason = "idle_timeout"
            elif (self._gap_since is not None and now >= self._gap_since + s.gap_timeout_s
                  and self._seq.next_seq not in self._persisting):
                self._skip_gap()
            self._apply_due()

    def _drain(self) -> None:
        """Apply everything acknowledged: the mailbox, then held batches past any
        gap, then the pending chunk."""
        while True:
            try:
                self._take(self._rx.receive_nowait())
            except trio.WouldBlock:
                break
        while self._held:
            self._skip_gap()
        self._apply_chunk()

    def _skip_gap(self) -> None:
        log.warning("batch %d never arrived; skipped", self._seq.next_seq,
                    extra={"session": self.log_id})
        self._seq.skip()
        self._gap_since = None
        self._apply_ready()

    def _take(self, batch: PoseBatch) -> None:
        self._held[batch.seq] = batch
        self._apply_ready()

    def _apply_ready(self) -> None:
        while self._seq.next_seq in self._held:
            batch = self._held.pop(self._seq.next_seq)
            self._record(batch)
            self._seq.applied(batch.seq, batch.last_t)
            self._apply_due()
        if not self._held:
            self._gap_since = None
        elif self._gap_since is None:
            self._gap_since = trio.current_time()
