"""The session supervisor: owns the actors' nursery and the registry of sessions.

Sessions are keyed by ``(org_id, session_id)``, so two organisations can never
reach each other's session even if their ids collide.

* A session's actor starts on its first pose batch or media batch.
* An ended session's summary is kept for ``ended_retention_s`` to answer repeated
  end calls with the same summary and late batches with 409.
* Failure isolation: an actor never raises out of its task (see
  :mod:`actors.session`); a crash ends only that session, with reason ``actor_error``.

Shutdown (:meth:`Supervisor.drain`): stop admitting sessions, ask every live actor
to end with reason ``shutdown``, and wait for their finalisation up to a deadline.
:meth:`run` returns once drained; cancelling it cancels any actor still running.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

from actors.durable import MEDIA, POSE
from actors.finalise import publish_and_close
from actors.pose_stats import PoseStats
from actors.recovery import RecoveryReport, recover
from actors.sequencer import Verdict
from actors.session import Offer, SessionActor, SessionEnded
from actors.summary import build_summary
from storage.blobs import BlobStore, blob_key
from storage.bus import Bus
from storage.spool import Spool
from telemetry.auth import SessionClaims
from telemetry.config import Settings
from telemetry.media_wire import MediaBatch
from telemetry.privacy import Pseudonymiser
from telemetry.wire import PoseBatch

log = logging.getLogger("telemetry.supervisor")

Key = tuple[str, str]


class SupervisorClosed(Exception):
    """The supervisor is draining or stopped and admits no new session."""


class TooManySessions(Exception):
    """A live-session limit (per process or per organisation) is reached."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Ended:
    summary: dict[str, Any]
    expires: float


class Supervisor:
    def __init__(
        self, settings: Settings, *, store: BlobStore, bus: Bus, pseudonyms: Pseudonymiser,
        spool: Spool | None = None,
    ) -> None:
        self._spool = spool
        self._settings = settings
        self.settings = settings
        self.recovered: RecoveryReport | None = None
        self._store = store
        self._bus = bus
        self._pseudonyms = pseudonyms
        self._live: dict[Key, SessionActor] = {}
        self._per_org: dict[str, int] = {}
        self._ended: OrderedDict[Key, _Ended] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._stopped = trio.Event()
        self.crashed = 0

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the actors until :meth:`drain` has finished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._spool is not None:
                report = await recover(self, self._spool)
                log.info("recovered from spool", extra=vars(report))
                self.recovered = report
            task_status.started()
            await self._stopped.wait()
            nursery.cancel_scope.cancel()

    # -- used by recovery -------------------------------------------------------------

    def adopt(self, claims: SessionClaims, started_wall: float) -> SessionActor:
        """A recovered session's actor, registered but not started (no limits apply:
        it was admitted before)."""
        actor = self._new_actor(claims)
        actor.started_wall = started_wall
        actor.start_written = True
        return actor

    def abandon(self, actor: SessionActor) -> None:
        """Unregister an adopted actor that will not be launched."""
        self._unregister(actor)

    def _unregister(self, actor: SessionActor) -> None:
        """Drop ``actor`` from the registry (idempotent; never a newer actor of the
        same session that took its place)."""
        key = (actor.org_id, actor.session_id)
        if self._live.get(key) is actor:
            del self._live[key]
            self._release_org(actor.org_id)

    def launch(self, actor: SessionActor) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._host, actor)

    def remember(self, org_id: str, session_id: str, summary: dict[str, Any],
                 ttl_s: float) -> None:
        self._ended[(org_id, session_id)] = _Ended(summary, trio.current_time() + ttl_s)

    def resume_publish(self, key: str, summary: dict[str, Any]) -> None:
        assert self._nursery is not None and self._spool is not None
        org_id, session_id = key.split("/")
        self.remember(org_id, session_id, summary, self._settings.ended_retention_s)
        self._nursery.start_soon(publish_and_close, self._bus, self._spool, key, summary,
                                 self._pseudonyms.session(org_id, session_id))

    async def drain(self, deadline_s: float | None = None) -> int:
        """Hand every live session over to the spool (``shutdown_mode=flush``, the
        default with a spool) or end it (reason ``shutdown``), waiting up to
        ``deadline_s``.

        Returns how many sessions were still unfinished at the deadline; those are
        cancelled when :meth:`run` exits. Safe to call more than once.
        """
        self._closed = True
        deadline_s = self._settings.shutdown_deadline_s if deadline_s is None else deadline_s
        actors = list(self._live.values())
        hand_over = self._spool is not None and self._settings.shutdown_mode == "flush"
        for actor in actors:
            if hand_over:
                actor.hand_over()
            else:
                actor.request_end("shutdown")
        with trio.move_on_after(deadline_s):
            for actor in actors:
                await actor.finished.wait()
        left = sum(1 for a in actors if not a.finished.is_set())
        if left:
            log.error("shutdown deadline passed with %d sessions unfinished", left)
        self._stopped.set()
        return left

    @property
    def accepting(self) -> bool:
        return not self._closed

    # -- used by the HTTP handlers ----------------------------------------------------

    def ended_summary(self, org_id: str, session_id: str) -> dict[str, Any] | None:
        self._expire()
        ended = self._ended.get((org_id, session_id))
        return ended.summary if ended else None

    def offer(self, claims: SessionClaims, batch: PoseBatch) -> Offer:
        actor = self._actor(claims)
        if actor is None:
            return Offer("ended", "session has ended")
        return actor.offer(batch)

    def offer_media(self, claims: SessionClaims, batch: MediaBatch) -> tuple[int, int]:
        """Apply a media batch to the session's actor, starting it if needed.

        Raises :class:`SessionEnded`, :class:`MediaTrackerError` or
        :class:`SupervisorClosed`."""
        actor = self._actor(claims)
        if actor is None:
            raise SessionEnded("session has ended")
        return actor.offer_media(batch)

    async def submit(self, claims: SessionClaims, batch: PoseBatch, body: bytes) -> Offer:
        """The durable ingest path: judge, spool (fsync), then accept. The answer is
        ACCEPT only once the batch is on disk. Raises :class:`SupervisorClosed`,
        :class:`TooManySessions` and the spool's ``SpoolFull``/``OSError``."""
        fresh = (claims.org_id, claims.session_id) not in self._live
        actor = await self._live_or_new(claims)
        if actor is None:
            return Offer("ended", "session has ended")
        offer = actor.check(batch)
        if offer.verdict is not Verdict.ACCEPT:
            if fresh and actor.holds_nothing:
                # Refused before it held anything (e.g. a session continuing from
                # another instance, far past seq 0): no actor must linger here, or its
                # idle timeout would publish an empty summary under the session's id.
                self._unregister(actor)  # at once: the next request starts afresh
                actor.discard()
            return offer
        with actor.admitting():
            await actor.persist(POSE, body)
            return actor.accept(batch)

    async def submit_media(self, claims: SessionClaims, batch: MediaBatch,
                           body: bytes) -> tuple[int, int]:
        """Durable media path: spool, then apply. Raises as :meth:`offer_media`."""
        actor = await self._live_or_new(claims)
        if actor is None or actor.ending:
            raise SessionEnded("session has ended")
        actor.media.check(batch)
        with actor.admitting():
            await actor.persist(MEDIA, body)
            return actor.offer_media(batch)

    async def _live_or_new(self, claims: SessionClaims) -> SessionActor | None:
        key = (claims.org_id, claims.session_id)
        actor = self._live.get(key)
        if actor is not None:
            return actor
        if self.ended_summary(*key) is not None:
            return None
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
            if self.ended_summary(*key) is not None:
                return None
            actor = self._start(claims)
        return actor

    async def end(self, claims: SessionClaims, reason: str = "client_end") -> dict[str, Any]:
        """End a session and return its summary; the same summary on repeated calls.

        A session that never sent a batch is ended at once with an empty summary, so
        the Core API still learns that it ended."""
        key = (claims.org_id, claims.session_id)
        summary = self.ended_summary(*key)
        if summary is not None:
            return summary
        actor = self._live.get(key)
        if actor is None:
            if await self._store.exists(blob_key(*key)):
                raise SessionEnded("session ended earlier; its summary is no longer held here")
            # The first batch may have started the session while we asked the store.
            summary = self.ended_summary(*key)
            if summary is not None:
                return summary
            actor = self._live.get(key)
            if actor is None:
                return await self._end_empty(claims, reason)
        actor.request_end(reason)
        await actor.finished.wait()
        if actor.summary is None:  # handed over or discarded meanwhile (shutdown)
            raise SupervisorClosed("the session was handed over; end it again later")
        return actor.summary

    def live(self) -> list[SessionActor]:
        return list(self._live.values())

    def find(self, session_id: str, org_id: str | None = None) -> list[SessionActor]:
        return [
            a for (o, s), a in self._live.items()
            if s == session_id and (org_id is None or o == org_id)
        ]

    # -- internals ------------------------------------------------------------------

    def _start(self, claims: SessionClaims) -> SessionActor:
        if self._closed or self._nursery is None:
            raise SupervisorClosed("service is shutting down")
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

    def _new_actor(self, claims: SessionClaims) -> SessionActor:
        self._per_org[claims.org_id] = self._per_org.get(claims.org_id, 0) + 1
        log_id = self._pseudonyms.session(claims.org_id, claims.session_id)
        actor = SessionActor(
            claims, settings=self._settings, store=self._store, bus=self._bus, log_id=log_id,
            spool=self._spool,
        )
        self._live[(claims.org_id, claims.session_id)] = actor
        return actor

    async def _host(self, actor: SessionActor) -> None:
        key = (actor.org_id, actor.session_id)
        try:
            await actor.run()
        finally:
            # Runs on cancellation too, so the registry never keeps a dead actor.
            self._unregister(actor)
            if actor.summary is not None:
                self._remember(key, actor.summary)
                if actor.end_reason == "actor_error":
                    self.crashed += 1
                log.info("session ended", extra={
                    "session": actor.log_id, "end_reason": actor.summary["end_reason"],
                    "frames": actor.stats.frames, "published": actor.summary.get("published"),
                })

    def _release_org(self, org_id: str) -> None:
        left = self._per_org[org_id] - 1
        if left:
            self._per_org[org_id] = left
        else:
            del self._per_org[org_id]

    async def _end_empty(self, claims: SessionClaims, reason: str) -> dict[str, Any]:
        wall = time.time()
        summary = build_summary(
            claims=claims, space=None, started_wall=wall, ended_wall=wall, end_reason=reason,
            blob=None, stats=PoseStats(), skipped=0, duplicates=0, reps=None, error=None,
        )
        key = (claims.org_id, claims.session_id)
        # Remember before the publish await so a concurrent end call gets the same one.
        self._remember(key, summary)
        try:
            await self._bus.publish(summary)
            summary["published"] = True
        except Exception as exc:
            log.warning("publish of empty session failed: %s", type(exc).__name__)
            summary["published"] = False
        return summary

    def _remember(self, key: Key, summary: dict[str, Any]) -> None:
        self._ended[key] = _Ended(summary, trio.current_time() + self._settings.ended_retention_s)
        self._ended.move_to_end(key)
        self._expire()

    def _expire(self) -> None:
        now = trio.current_time()
        while self._ended:
            key, ended = next(iter(self._ended.items()))
            if ended.expires > now:
                break
            del self._ended[key]
