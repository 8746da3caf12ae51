"""The session supervisor: admission of batches and end calls.

It hosts the actors through :class:`actors.hosting.ActorHost` (their nursery, the
registry of live and ended sessions, recovery at start-up, :meth:`drain` at
shutdown). Sessions are keyed by ``(org_id, session_id)``, so two organisations can
never reach each other's session even if their ids collide.

* A session's actor starts on its first pose batch or media batch.
* An ended session's summary is kept for ``ended_retention_s`` to answer repeated
  end calls with the same summary and late batches with 409.
* An end call waits at most ``end_wait_s`` for finalisation. Past it (storage down),
  it raises :class:`NotFinalised` (the API answers 503 + Retry-After) while the
  actor keeps retrying; a repeated end call returns the summary once it is stored.
  A 200 is only ever answered for a summary whose blob is stored and whose event is
  in the outbox (``docs/durability.md``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import trio

from actors.admission import Offer, end_offer, end_refusal
from actors.backoff import MAX_BACKOFF_S, retry
from actors.durable import MEDIA, session_key
from actors.ended import Ended as _Ended
from actors.ended import Key
from actors.fleet import ELSEWHERE
from actors.hosting import ActorHost
from actors.limits import ActorLimits
from actors.pose_stats import PoseStats
from actors.sequencer import Verdict
from actors.session import SessionActor
from actors.summary import build_summary
from domain.claims import SessionClaims
from domain.errors import (
    NotFinalised,
    SessionEnded,
    SessionMoving,
    ShuttingDown,
    TooManySessions,
)
from domain.media_batch import MediaBatch
from domain.pose_batch import PoseBatch
from domain.privacy import Pseudonymiser
from storage.blobs import BlobStore, blob_key
from storage.bus import Bus
from storage.journal import Journal
from storage.ownership import Ownership

log = logging.getLogger("telemetry.supervisor")

# How long an end call waits for finalisation before answering 503 + Retry-After.
# Finalisation takes milliseconds to a few seconds when storage is healthy; past
# this, storage is failing, and a client (or a load balancer's idle timeout) should
# not be left hanging while it is retried.
END_WAIT_S = 15.0


class Supervisor(ActorHost):
    """Admission and end calls on top of :class:`actors.hosting.ActorHost`."""

    def __init__(
        self, settings: ActorLimits, *, store: BlobStore, bus: Bus, pseudonyms: Pseudonymiser,
        journal: Journal | None = None, ownership: Ownership | None = None,
    ) -> None:
        super().__init__(settings, store=store, bus=bus, pseudonyms=pseudonyms, journal=journal,
                         ownership=ownership)
        self.end_wait_s = END_WAIT_S


    # -- used by the HTTP handlers ----------------------------------------------------

    def offer(self, claims: SessionClaims, batch: PoseBatch) -> Offer:
        actor = self._actor(claims)
        if actor is None:
            return self._refusal((claims.org_id, claims.session_id))
        return actor.offer(batch)

    def offer_media(self, claims: SessionClaims, batch: MediaBatch) -> tuple[int, int]:
        """Apply a media batch to the session's actor, starting it if needed.

        Raises :class:`SessionEnded`, :class:`SessionEnding`, :class:`MediaRejected`,
        :class:`MediaFinished` or :class:`ShuttingDown` (all of domain.errors)."""
        actor = self._actor(claims)
        if actor is None:
            self._refuse_media((claims.org_id, claims.session_id))
        assert actor is not None
        return actor.offer_media(batch)

    async def submit(self, claims: SessionClaims, batch: PoseBatch, body: bytes) -> Offer:
        """The durable ingest path: judge, spool (fsync), then accept
        (:meth:`SessionActor.admit_checked`), all on the caller's task. The answer is
        ACCEPT only once the batch is on disk. Raises :class:`ShuttingDown`,
        :class:`TooManySessions` and the spool's ``SpoolFull``/``OSError``."""
        actor = self._live.get((claims.org_id, claims.session_id))
        fresh = actor is None
        if actor is None:
            actor = await self._live_or_new(claims)
            if actor is None:
                return self._refusal((claims.org_id, claims.session_id))
        offer = actor.check(batch)
        if offer.verdict is not Verdict.ACCEPT:
            if fresh and actor.holds_nothing:
                # Refused before it held anything (e.g. a session continuing from
                # another instance, far past seq 0): no actor must linger here, or its
                # idle timeout would publish an empty summary under the session's id.
                self._unregister(actor)  # at once: the next request starts afresh
                actor.discard()
            return offer
        return await actor.admit_checked(batch, body)

    async def submit_media(self, claims: SessionClaims, batch: MediaBatch,
                           body: bytes) -> tuple[int, int]:
        """Durable media path: spool, then apply. Raises as :meth:`offer_media`."""
        actor = await self._live_or_new(claims)
        if actor is None:
            self._refuse_media((claims.org_id, claims.session_id))
        assert actor is not None
        actor.check_media(batch)
        with actor.admitting():
            await actor.persist(MEDIA, body)
            return actor.offer_media(batch)

    async def _live_or_new(self, claims: SessionClaims) -> SessionActor | None:
        key = (claims.org_id, claims.session_id)
        actor = self._live.get(key)
        if actor is not None:
            return actor
        if self._entry(key) is not None:
            return None
        if self.fleet is not None:
            if self._closed:
                raise ShuttingDown("service is shutting down")
            # Another instance may hold the session: take it over (actors.fleet).
            got = await self.fleet.acquire(key)
            if got is ELSEWHERE:
                return None  # its end is recorded and its owner is finishing it: 409
            if got is not None or self._entry(key) is not None:
                return got
        # A session finalised before a restart (and past the summary's retention)
        # must not start again and overwrite its blob.
        if await self._store.exists(blob_key(*key)):
            return None
        return self._actor(claims)  # re-checks: a concurrent request may have started it

    def _actor(self, claims: SessionClaims) -> SessionActor | None:
        """The live actor for the claims' session, started if new; None if ended."""
        key = (claims.org_id, claims.session_id)
        actor = self._live.get(key)
        if actor is None:
            if self._entry(key) is not None:
                return None
            actor = self._start(claims)
        return actor

    def _refusal(self, key: Key) -> Offer:
        """The answer to a batch for a session that is not live here but known as
        ended (or ended before a restart: its blob exists)."""
        return end_offer(self._recorded(key), 1.0)

    def _refuse_media(self, key: Key) -> NoReturn:
        raise end_refusal(self._recorded(key), 1.0, media=True)

    def _recorded(self, key: Key) -> bool:
        """Whether the end of a session that is not live here is durable."""
        entry = self._entry(key)
        return entry is None or entry.recorded

    async def end(self, claims: SessionClaims, reason: str = "client_end") -> dict[str, Any]:
        """End a session and return its summary (see :meth:`_end`). Fleet mode: if
        the actor here turns out to have been taken over elsewhere, the call takes
        the session back once, at once, instead of asking the client to retry."""
        try:
            return await self._end(claims, reason)
        except SessionMoving:
            actor = self._live.get((claims.org_id, claims.session_id))
            if self.fleet is None:
                raise
            if actor is not None:
                with trio.move_on_after(self.end_wait_s):
                    await actor.finished.wait()
            return await self._end(claims, reason)

    async def _end(self, claims: SessionClaims, reason: str) -> dict[str, Any]:
        """End a session and return its summary; the same summary on repeated calls.

        Returns only a stored summary (blob stored and verified, event in the
        outbox), waiting at most :attr:`end_wait_s` for it; then raises
        :class:`NotFinalised` while finalisation carries on retrying (a repeated
        call also cuts its retry pause short). Also raises :class:`SessionEnded`
        (ended before a restart, summary no longer held), :class:`ShuttingDown`
        (handed over at shutdown) and the blob store's errors (its lookup of an
        unknown session). Cancellation of the caller never cancels finalisation.

        A session that never sent a batch is ended at once with an empty summary, so
        the Core API still learns that it ended."""
        key = (claims.org_id, claims.session_id)
        entry = self._entry(key)
        if entry is not None:
            return await self._await_entry(entry)
        actor = self._live.get(key)
        if actor is None and self.fleet is not None:
            got = await self.fleet.acquire(key)
            if got is ELSEWHERE:
                raise NotFinalised("the session has ended and another instance is storing "
                                   "its summary; ask again", 2.0, recorded=True)
            entry = self._entry(key)
            if entry is not None:
                return await self._await_entry(entry)
            actor = got
        if actor is not None and actor.moved:
            raise SessionMoving()
        if actor is None:
            if await self._store.exists(blob_key(*key)):
                raise SessionEnded("session ended earlier; its summary is no longer held here")
            # The first batch may have started the session while we asked the store.
            entry = self._entry(key)
            if entry is not None:
                return await self._await_entry(entry)
            actor = self._live.get(key)
            if actor is None:
                return await self._end_empty(claims, reason)
        return await self._end_actor(actor, reason)

    async def end_ended(self, key: Key) -> dict[str, Any]:
        """The summary of a session held as ended (:meth:`find_ended`), waiting as
        :meth:`end` does; KeyError if it is no longer held."""
        entry = self._entry(key)
        if entry is None:
            raise KeyError("session is not held as ended")
        return await self._await_entry(entry)

    async def _end_actor(self, actor: SessionActor, reason: str) -> dict[str, Any]:
        actor.request_end(reason)
        with trio.move_on_after(self.end_wait_s):
            await actor.finished.wait()
        if actor.summary is not None:
            return actor.summary
        if actor.finished.is_set() and actor.moved:
            raise SessionMoving()
        if actor.finished.is_set() and actor.handed_over:
            raise ShuttingDown("the session was handed over; end it again later")
        if actor.finished.is_set():
            # Finalisation raised (a bug); the session waits on disk for the next start.
            raise NotFinalised("the session's finalisation failed; it resumes when the "
                               "service restarts", MAX_BACKOFF_S, recorded=actor.end_recorded)
        if not actor.end_recorded:
            raise NotFinalised("the session's end could not be stored yet; it is being "
                               "retried", actor.retry_hint(), recorded=False)
        raise NotFinalised("the session has ended; its replay or summary is not stored "
                           "yet and is being retried", actor.retry_hint(), recorded=True)

    async def _await_entry(self, entry: _Ended) -> dict[str, Any]:
        entry.backoff.kick()
        # No summary: finalisation raised, and nothing sets ``stored`` before the next
        # start, so waiting would only hold the request.
        if entry.summary is not None:
            with trio.move_on_after(self.end_wait_s):
                await entry.stored.wait()
        if entry.stored.is_set() and entry.summary is not None and not entry.failed:
            return entry.summary
        if entry.failed:
            raise NotFinalised("the session's end could not be stored; try again",
                               5.0, recorded=False)
        if entry.summary is None:
            raise NotFinalised("the session's finalisation failed; it resumes when the "
                               "service restarts", MAX_BACKOFF_S, recorded=entry.recorded)
        raise NotFinalised("the session has ended; its summary is not stored yet and is "
                           "being retried", 5.0, recorded=entry.recorded)

    # -- internals ------------------------------------------------------------------

    def _start(self, claims: SessionClaims) -> SessionActor:
        if self._closed or self._nursery is None:
            raise ShuttingDown("service is shutting down")
        s = self._settings
        # A new session must wait for another to end: a few seconds is a fair hint.
        if len(self._live) >= s.max_live_sessions:
            raise TooManySessions(f"this instance holds its maximum of {s.max_live_sessions} "
                                  "live sessions", retry_after=5)
        if self._per_org.get(claims.org_id, 0) >= s.max_sessions_per_org:
            raise TooManySessions(f"the organisation has its maximum of "
                                  f"{s.max_sessions_per_org} live sessions here", retry_after=5)
        actor = self._new_actor(claims)
        self._nursery.start_soon(self._host, actor)
        log.info("session started", extra={
            "session": actor.log_id, "patient": self._pseudonyms.patient(claims.patient_id),
            "exercise": claims.exercise.kind,
        })
        return actor

    async def _end_empty(self, claims: SessionClaims, reason: str) -> dict[str, Any]:
        """End a session that holds nothing: publish an empty summary.

        With a spool, the summary is first recorded as the session's ``publish``
        state, exactly as a finalised session's is, and then published and kept by
        :func:`publish_and_close` in a supervisor task that retries until done; the
        call waits up to :attr:`end_wait_s` for it, else :class:`NotFinalised`.
        Until the record is on disk a batch is told to retry (503), after it 409,
        and a restart resumes the publish: the session cannot come back live and
        take batches whose summary would then collide with this one's event id.

        Without a spool the publish is retried for :attr:`end_wait_s`; if the outbox
        does not take it, nothing is recorded (``recorded=False``). Cancellation
        leaves nothing recorded that a restart would not finish."""
        wall = time.time()
        summary = build_summary(
            claims=claims, space=None, started_wall=wall, ended_wall=wall, end_reason=reason,
            blob=None, stats=PoseStats(), skipped=0, duplicates=0, reps=None, error=None,
        )
        key = (claims.org_id, claims.session_id)
        log_id = self._pseudonyms.session(*key)
        # Registered before any await so a concurrent end call waits for this one,
        # and a batch meanwhile is told to retry (503), not that it ended.
        entry = _Ended(summary, trio.current_time() + self._settings.ended_retention_s,
                       trio.Event(), recorded=False)
        self._put(key, entry)
        if self._journal is not None:
            assert self._nursery is not None
            self._publishing.add(entry)
            self._nursery.start_soon(self._finish_empty, session_key(*key), entry, log_id)
            return await self._await_entry(entry)
        ok = False
        try:
            with trio.move_on_after(self.end_wait_s):
                ok, _ = await retry(lambda: self._bus.publish(summary),
                                    "publish of empty session", log_id, None)
        finally:
            if ok:
                summary["published"] = True
                entry.recorded = True
            else:
                entry.failed = True
                self._ended.discard(key, entry)
            entry.stored.set()
        if not ok:
            raise NotFinalised("the session's end could not be stored; try again", 5.0,
                               recorded=False)
        return summary
