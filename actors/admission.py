"""Admission: how a live session judges the batches offered to it.

The handler side of a :class:`actors.session.SessionActor` (which inherits
:class:`Admission`): synchronous, no checkpoints, so a handler and the actor, on
one Trio thread, always see one consistent state. A pose batch is judged by
:meth:`Admission.check` (sequence, space, rate limit, mailbox), then
:meth:`Admission.admit_checked` makes it durable and queues it, counted as an
admission in flight so that a session that ends meanwhile still takes it. The
sequencer judges a batch once: its verdict is judged again after the spool's await
only if the sequencer took or skipped a batch meanwhile (:meth:`Admission._mark`).

A refusal is an :class:`Offer` carrying an error of the tree
(:mod:`domain.errors`), *returned*, not raised: a refused batch on the hot path
costs no traceback. Media batches are applied at once and raise their refusal.
Only :meth:`Admission.admit_checked` awaits (the journal): it passes
``trio.Cancelled`` on, and the batch is then not queued (nor acknowledged).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import trio

from actors.backoff import MAX_BACKOFF_S, Backoff
from actors.durable import POSE
from actors.media_tracker import MediaTrackerError
from actors.sequencer import Sequencer, Verdict
from domain.errors import (
    MailboxFull,
    MediaFinished,
    MediaRejected,
    RateLimited,
    SequenceAheadOfWindow,
    SequenceSkipped,
    SessionEnded,
    SessionEnding,
    SessionMoving,
    SpaceChanged,
    TelemetryError,
    TimestampsOverlap,
)
from domain.media_batch import MediaBatch
from domain.pose_batch import PoseBatch

if TYPE_CHECKING:
    from actors.limits import ActorLimits
    from actors.media_tracker import MediaTracker

FRAMES_ENDED = "session has ended; no more frames accepted"
EVENTS_ENDED = "session has ended; no more events accepted"


@dataclass(frozen=True, slots=True)
class Offer:
    """The answer to one pose batch: ``refusal`` is None when it was taken (new or a
    duplicate), else the error the client is answered with."""

    verdict: Verdict
    refusal: TelemetryError | None = None

    @property
    def accepted(self) -> bool:
        return self.refusal is None


# The two answers to a batch that is taken, shared: accepting allocates nothing.
ACCEPTED = Offer(Verdict.ACCEPT)
DUPLICATE = Offer(Verdict.DUPLICATE)
MOVING = Offer(Verdict.ENDING, SessionMoving())


def end_refusal(recorded: bool, retry_after: float, *, media: bool = False) -> TelemetryError:
    """What data for an ending session gets: :class:`SessionEnded` once its end is
    durable, :class:`SessionEnding` (retry) before."""
    if recorded:
        return SessionEnded(EVENTS_ENDED if media else FRAMES_ENDED)
    return SessionEnding(retry_after=retry_after)


def end_offer(recorded: bool, retry_after: float) -> Offer:
    """:func:`end_refusal` for a pose batch, as an offer."""
    return Offer(Verdict.ENDED if recorded else Verdict.ENDING,
                 end_refusal(recorded, retry_after))


def _sequence_offer(verdict: Verdict, message: str, retry_after: float | None) -> Offer:
    """The refusal of a batch the sequencer did not take (SKIPPED, AHEAD, OVERLAP)."""
    if verdict is Verdict.SKIPPED:
        return Offer(verdict, SequenceSkipped(message))
    if verdict is Verdict.AHEAD_OF_WINDOW:
        return Offer(verdict, SequenceAheadOfWindow(message, retry_after))
    return Offer(verdict, TimestampsOverlap(message))


def media_refusal(exc: MediaTrackerError) -> TelemetryError:
    """The tree's error for a media batch the tracker refused as a whole."""
    if exc.code == "finished":
        return MediaFinished(str(exc))
    return MediaRejected(str(exc), code=exc.code)


class Admission(ABC):
    """The admission half of a session actor (see the module doc). The attributes
    below are the actor's; :class:`~actors.session.SessionActor` sets them."""

    settings: ActorLimits
    space: str | None
    media: MediaTracker
    duplicates: int
    backoff: Backoff
    moved: bool
    _seq: Sequencer
    _tx: trio.MemorySendChannel[PoseBatch]
    _rate: float
    _tokens: float
    _tokens_at: float
    _admitting: int
    _admissions_done: trio.Event
    _persisting: dict[int, int]  # seq -> admissions of it awaiting the journal
    _judging: TurnOrder
    _accepted: int
    _draining: bool
    _handover: bool

    # The actor's own side, which admission calls (SessionActor implements each).

    @property
    @abstractmethod
    def ending(self) -> bool: ...

    @property
    @abstractmethod
    def end_recorded(self) -> bool: ...

    @abstractmethod
    def _start_pose(self, first: PoseBatch) -> None: ...

    @abstractmethod
    def _touch(self, first_t_ms: int) -> None: ...

    @abstractmethod
    async def persist(self, kind: int, body: bytes) -> None: ...

    def retry_hint(self) -> float:
        """Seconds a client should wait before asking again while the end is being
        recorded or finalised: the current retry pause, within 1..30 s."""
        return max(1.0, min(MAX_BACKOFF_S, self.backoff.delay or 1.0))

    def ended_offer(self) -> Offer:
        """The refusal of a batch once the session is ending: :class:`SessionEnded`
        (409) once the end is durable, :class:`SessionEnding` (retry) before;
        :class:`SessionMoving` (retry) once another instance took it over."""
        if self.moved:
            return MOVING
        return end_offer(self.end_recorded, self.retry_hint())

    def offer(self, batch: PoseBatch) -> Offer:
        """:meth:`check` then :meth:`accept`: the path without a spool. Never blocks."""
        verdict = self.check(batch)
        return self.accept(batch) if verdict.verdict is Verdict.ACCEPT else verdict

    def check(self, batch: PoseBatch) -> Offer:
        """Judge ``batch`` without taking it. ACCEPT means: make it durable, then call
        :meth:`accept`. A new (non-duplicate) batch spends a rate-limit token here."""
        if self.ending:
            return self.ended_offer()
        if self.space is not None and batch.space != self.space:
            return Offer(Verdict.SPACE_CHANGED, SpaceChanged(
                f"session streams {self.space!r} coordinates; "
                f"batch {batch.seq} is {batch.space!r}"))
        verdict, message = self._seq.check(batch.seq, batch.first_t, batch.last_t)
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
            return DUPLICATE
        if verdict is not Verdict.ACCEPT:
            # Soon, well before the gap timeout: by then the missing batch has usually
            # arrived; at the gap timeout itself the retry would race the skip.
            return _sequence_offer(verdict, message,
                                   min(1.0, self.settings.gap_timeout_s / 4))
        now = trio.current_time()
        self._tokens = min(2 * self._rate, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            return Offer(Verdict.RATE_LIMITED, RateLimited(
                f"more than {self._rate:g} batches per second",
                (1.0 - self._tokens) / self._rate))
        stats = self._tx.statistics()
        if stats.current_buffer_used >= stats.max_buffer_size:
            return Offer(Verdict.MAILBOX_FULL, MailboxFull())
        self._tokens -= 1.0
        return ACCEPTED

    @contextmanager
    def admitting(self) -> Iterator[None]:
        """Wrap check → persist → accept: a session ended meanwhile still takes the
        batch (it came before the end call), because the actor waits for admissions
        in flight before it drains and finalises. (:meth:`admit_checked` counts its
        own, without a context manager: it runs for every batch.)"""
        self._admitting += 1
        try:
            yield
        finally:
            self._admission_ended()

    def _admission_ended(self) -> None:
        self._admitting -= 1
        if not self._admitting:
            self._admissions_done.set()

    def _mark(self) -> tuple[int, int]:
        """What must stay the same for a batch :meth:`check` accepted to still be
        accepted by the sequencer: the batches it took (:meth:`accept`, recovery)
        and the gaps it skipped. Batches applied meanwhile change nothing: only a
        batch taken earlier is applied, and its place and times stay as they were."""
        return self._accepted, self._seq.skipped_count

    async def admit_checked(self, batch: PoseBatch, body: bytes) -> Offer:
        """Make a batch :meth:`check` accepted durable (``body``, to the journal), then
        queue it: the durable path's accept. Counted as an admission in flight
        meanwhile (see :meth:`admitting`). The sequencer judges it again only if it
        took or skipped a batch during the await (a concurrent retry of the same batch
        then reads as a duplicate). Raises the journal's errors; passes
        ``trio.Cancelled`` on (nothing queued)."""
        mark = self._mark()
        self._admitting += 1
        # While it is being made durable, the gap timer must not skip it: it would be
        # in the journal, and refused here (a later replay would then apply it).
        self._persisting[batch.seq] = self._persisting.get(batch.seq, 0) + 1
        turn = self._judging.take()
        try:
            await self.persist(POSE, body)
            # Judged in the order they were checked, which is the order they reached
            # the journal: a replay then judges them exactly as they were judged here
            # (two batches from one commit round wake in either order).
            await self._judging.wait_for(turn)
            if mark != self._mark() or self._draining or self._handover:
                return self.accept(batch)
            return self._queue(batch)
        finally:
            self._judging.done(turn)
            left = self._persisting[batch.seq] - 1
            if left:
                self._persisting[batch.seq] = left
            else:
                del self._persisting[batch.seq]
            self._admission_ended()

    def accept(self, batch: PoseBatch) -> Offer:
        """Queue a batch that :meth:`check` accepted (and the caller made durable).

        Judges again, because the session may have changed while the caller awaited
        the spool: a concurrent retry of the same batch now reads as a duplicate."""
        if self._draining or self._handover:
            return self.ended_offer()
        verdict, message = self._seq.check(batch.seq, batch.first_t, batch.last_t)
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
            return DUPLICATE
        if verdict is not Verdict.ACCEPT:
            return _sequence_offer(verdict, message, None)
        return self._queue(batch)

    def _queue(self, batch: PoseBatch) -> Offer:
        """Queue a batch the sequencer accepts now, and take it into the sequence."""
        try:
            self._tx.send_nowait(batch)
        except trio.WouldBlock:
            return Offer(Verdict.MAILBOX_FULL, MailboxFull())
        if self.space is None:
            self._start_pose(batch)
        self._seq.accept(batch.seq, batch.first_t, batch.last_t)
        self._accepted += 1
        self._touch(batch.first_t)
        return ACCEPTED

    def check_media(self, batch: MediaBatch) -> None:
        """Raise what :meth:`offer_media` would refuse ``batch`` with, taking nothing
        (the durable path checks before it spools)."""
        if self.ending:
            self.refuse_media()
        try:
            self.media.check(batch)
        except MediaTrackerError as exc:
            raise media_refusal(exc) from None

    def offer_media(self, batch: MediaBatch) -> tuple[int, int]:
        """Apply a media batch now: ``(applied, not_applied)``.

        Media metrics are cheap, pure and independent of pose order, so they are
        applied on the caller's task (no checkpoint: the actor cannot interleave),
        and the client learns exactly what was taken. Raises :class:`MediaRejected`
        or :class:`MediaFinished` for a batch the session refuses as a whole, and
        :class:`SessionEnded` once the session is draining (:class:`SessionEnding`
        while its end is not durable yet)."""
        if self._draining or self.moved:
            self.refuse_media()
        try:
            result = self.media.apply(batch)
        except MediaTrackerError as exc:
            raise media_refusal(exc) from None
        self._touch(batch.events[0].t_ms)
        return result

    def refuse_media(self) -> NoReturn:
        """Raise what a media batch gets once the session is ending."""
        if self.moved:
            raise SessionMoving()
        raise end_refusal(self.end_recorded, self.retry_hint(), media=True)


class TurnOrder:
    """Turns handed out in order; :meth:`wait_for` returns once every earlier turn is
    :meth:`done`. A turn is done whatever happens to its holder (error or
    cancellation), so a later one never waits for ever."""

    def __init__(self) -> None:
        self._next = 0  # the next turn handed out
        self._now = 0  # the earliest turn not done
        self._done: set[int] = set()
        self._moved = trio.Event()

    def take(self) -> int:
        turn, self._next = self._next, self._next + 1
        return turn

    async def wait_for(self, turn: int) -> None:
        """Return once ``turn`` is the earliest not done (at once, without a
        checkpoint, if it already is). Cancellation propagates."""
        while self._now != turn:
            await self._moved.wait()

    def done(self, turn: int) -> None:
        self._done.add(turn)
        if turn != self._now:
            return
        while self._now in self._done:
            self._done.discard(self._now)
            self._now += 1
        if self._moved.statistics().tasks_waiting:  # the usual case has none: no new Event
            self._moved.set()
            self._moved = trio.Event()
