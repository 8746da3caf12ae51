"""The supervisor's hosting side: the actors' nursery, its registry, start-up and
shutdown.

:class:`ActorHost` runs the session actors in its nursery and keeps the registry
of live sessions (keyed by ``(org_id, session_id)``, so two organisations never
reach each other's session) and of ended ones (:mod:`actors.ended`). The request
side (admission, end calls) is :class:`actors.supervisor.Supervisor`, built on it.

* Failure isolation: an actor never raises out of its task (see
  :mod:`actors.session`); a crash ends only that session, with reason ``actor_error``.
* Start-up (:meth:`ActorHost.run`): with a journal, carry out the recovery plan
  (:func:`actors.recovery.plan_recovery`) before admitting anything.
* Shutdown (:meth:`ActorHost.drain`): stop admitting sessions, hand every live
  actor over to the journal (or end it with reason ``shutdown``), and wait up to a
  deadline for them and for the summaries still being published by a task of their
  own (recovered at start-up, or of sessions ended empty). :meth:`run` returns once
  drained; cancelling it cancels any actor or publish still running (the journal
  keeps their step for the next start).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import trio

from actors.backoff import retry
from actors.ended import Ended, EndedRegistry, Key, stored_event
from actors.finalise import publish_and_close
from actors.fleet import FleetSessions
from actors.limits import ActorLimits
from actors.recovery import (
    Forget,
    KeepEnded,
    RecoveryReport,
    Resume,
    ResumePublish,
    plan_recovery,
    restore,
    session_start,
)
from actors.session import SessionActor
from domain.claims import SessionClaims
from domain.privacy import Pseudonymiser
from storage.blobs import BlobStore
from storage.bus import Bus
from storage.journal import Journal, Record
from storage.ownership import FencedJournal, Ownership

log = logging.getLogger("telemetry.supervisor")


class ActorHost:
    def __init__(
        self, settings: ActorLimits, *, store: BlobStore, bus: Bus, pseudonyms: Pseudonymiser,
        journal: Journal | None = None, ownership: Ownership | None = None,
    ) -> None:
        self._journal = journal
        # Fleet mode: sessions move between instances (actors.fleet).
        self.fleet: FleetSessions | None = None
        if ownership is not None:
            assert hasattr(journal, "take_over"), "fleet mode needs a fenced journal"
            self.fleet = FleetSessions(
                self, cast(FencedJournal, journal), ownership, lease_s=settings.lease_s,
                orphan_grace_s=settings.orphan_grace_s, sweep_s=settings.lease_s)
        self._settings = settings
        self.settings = settings
        self.recovered: RecoveryReport | None = None
        self._store = store
        self._bus = bus
        self._pseudonyms = pseudonyms
        self._live: dict[Key, SessionActor] = {}
        self._per_org: dict[str, int] = {}
        self._ended = EndedRegistry()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._stopped = trio.Event()
        # Summaries being published by a task of their own (recovered at ``publish``,
        # or of sessions ended empty): drain() waits for them as for the actors.
        self._publishing: set[Ended] = set()
        self.crashed = 0
        # Cumulative figures for the metrics (read at scrape time, as ``crashed``):
        # sessions ended by end reason, and batches the ended ones skipped.
        self.ended_by_reason: dict[str, int] = {}
        self.skipped_ended = 0

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the actors until :meth:`drain` has finished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.fleet is not None:
                # No start-up recovery: the sessions in the journal belong to the fleet;
                # this instance takes them over on demand or as orphans (actors.fleet).
                await nursery.start(self.fleet.run)
            elif self._journal is not None:
                report = await self._recover(self._journal)
                log.info("recovered from spool", extra=vars(report))
                self.recovered = report
            task_status.started()
            await self._stopped.wait()
            nursery.cancel_scope.cancel()

    async def _recover(self, journal: Journal) -> RecoveryReport:
        """Carry out the journal's recovery plan (see :mod:`actors.recovery`). A log
        that cannot be replayed is left alone and counted, never fatal."""
        retention = self.settings.ended_retention_s
        plan = await plan_recovery(journal, retention)
        report = RecoveryReport(unrecoverable=plan.unrecoverable)
        for step in plan.steps:
            if isinstance(step, Forget):
                await journal.remove(step.key)
            elif isinstance(step, KeepEnded):
                self.remember(step.org_id, step.session_id, step.summary, step.ttl_s)
                report.ended_kept += 1
            elif isinstance(step, ResumePublish):
                self.resume_publish(step.key, step.summary)
                report.finalising += 1
            else:
                try:
                    actor, records = await self._rebuild(journal, step)
                except Exception:  # one bad log must not keep the service from starting
                    log.exception("spool log could not be replayed; left alone")
                    report.unrecoverable += 1
                    # Its acknowledged batches are still on disk: the session must
                    # neither start afresh over them nor be ended empty (which would
                    # remove them) before a later start replays it. Its requests are
                    # answered "retry" (503), or "ended" if its end was recorded.
                    org_id, session_id = step.key.split("/", 1)
                    self._hold_unfinished((org_id, session_id), recorded=step.ended)
                    continue
                if actor is None:
                    continue
                report.records += records
                if step.ended:
                    report.finalising += 1
                else:
                    report.resumed += 1
                self.launch(actor)
        return report

    async def _rebuild(self, journal: Journal,
                       step: Resume) -> tuple[SessionActor | None, int]:
        records = await journal.replay(step.key)
        if not records:
            await journal.remove(step.key)  # nothing was ever acknowledged
            return None, 0
        return self.rebuild(records, step.end_reason if step.ended else None), len(records)

    # -- used by recovery -------------------------------------------------------------

    def rebuild(self, records: list[Record], end_reason: str | None = None) -> SessionActor:
        """A session's actor rebuilt from its journal records through the live code
        paths (:func:`actors.recovery.restore`), registered, not launched. With
        ``end_reason`` its end mark is durable: batches get 409 at once, and it
        finalises as soon as it is launched. Raises ValueError for a log that does not
        start with the session's claims, or what restoring raises (then nothing stays
        registered)."""
        claims, started_wall = session_start(records)
        actor = self.adopt(claims, started_wall)
        try:
            restore(actor, records)
        except Exception:
            self.abandon(actor)
            raise
        if end_reason is not None:
            actor.mark_end_recorded()
            actor.request_end(end_reason)
        return actor

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
        """Keep a finished session's summary (recovery: from the spool) for ``ttl_s``."""
        self._put((org_id, session_id), Ended(summary, trio.current_time() + ttl_s,
                                               stored_event()))

    def resume_publish(self, key: str, summary: dict[str, Any]) -> None:
        """Recovery of a session found at ``publish``: its end is durable (batches get
        409 at once); end calls get its summary once the event is in the outbox."""
        assert self._nursery is not None and self._journal is not None
        org_id, session_id = key.split("/")
        entry = Ended(summary, trio.current_time() + self._settings.ended_retention_s,
                       trio.Event())
        self._put((org_id, session_id), entry)
        self._publishing.add(entry)
        self._nursery.start_soon(self._publish_recovered, key, entry)

    async def _publish_recovered(self, key: str, entry: Ended) -> None:
        assert self._journal is not None and entry.summary is not None
        org_id, session_id = key.split("/")
        try:
            # Retries every step until done; only Cancelled (shutdown) escapes, and
            # then the state file still says ``publish`` for the next start.
            await publish_and_close(self._bus, self._journal, key, entry.summary,
                                    self._pseudonyms.session(org_id, session_id),
                                    entry.backoff)
            entry.stored.set()
            if self.fleet is not None:
                await self.fleet.finished(key)
        finally:
            self._publishing.discard(entry)

    async def drain(self, deadline_s: float | None = None) -> int:
        """Hand every live session over to the spool (``shutdown_mode=flush``, the
        default with a spool) or end it (reason ``shutdown``), waiting up to
        ``deadline_s``.

        Summaries still being published by a task of their own (recovered at
        ``publish``, or of sessions ended empty) get the same deadline.

        Returns how many sessions were still unfinished at the deadline (actors and
        publishes); those are cancelled when :meth:`run` exits, and the journal
        keeps their step for the next start. Safe to call more than once.
        """
        self._closed = True
        deadline_s = self._settings.shutdown_deadline_s if deadline_s is None else deadline_s
        actors = list(self._live.values())
        hand_over = self._journal is not None and self._settings.shutdown_mode == "flush"
        for actor in actors:
            if hand_over:
                actor.hand_over()
            else:
                actor.request_end("shutdown")
        publishing = list(self._publishing)
        with trio.move_on_after(deadline_s):
            for actor in actors:
                await actor.finished.wait()
            for entry in publishing:
                await entry.stored.wait()
            if self.fleet is not None:
                await self.fleet.passivate(actors)
        left = sum(1 for a in actors if not a.finished.is_set())
        left += sum(1 for e in publishing if not e.stored.is_set())
        if left:
            log.error("shutdown deadline passed with %d sessions unfinished", left)
        self._stopped.set()
        return left

    @property
    def accepting(self) -> bool:
        return not self._closed

    # -- read by the HTTP handlers and the metrics ---------------------------------------

    def ended_summary(self, org_id: str, session_id: str) -> dict[str, Any] | None:
        """The summary of a session that ended here, once it is stored (blob and
        event); None while it is still being finished, or unknown here."""
        ended = self._entry((org_id, session_id))
        if ended is None or not ended.stored.is_set() or ended.failed:
            return None
        return ended.summary

    def find_ended(self, session_id: str, org_id: str | None = None) -> list[Key]:
        """Keys of sessions held as ended here (for the admin end call)."""
        return self._ended.find(session_id, org_id)

    def live(self) -> list[SessionActor]:
        return list(self._live.values())

    def live_actor(self, key: Key) -> SessionActor | None:
        return self._live.get(key)

    def known_ended(self, key: Key) -> bool:
        """Held here as ended (its summary, or its finalisation under way)."""
        return self._entry(key) is not None

    def find(self, session_id: str, org_id: str | None = None) -> list[SessionActor]:
        return [
            a for (o, s), a in self._live.items()
            if s == session_id and (org_id is None or o == org_id)
        ]

    # -- internals ------------------------------------------------------------------

    def _new_actor(self, claims: SessionClaims) -> SessionActor:
        self._per_org[claims.org_id] = self._per_org.get(claims.org_id, 0) + 1
        log_id = self._pseudonyms.session(claims.org_id, claims.session_id)
        actor = SessionActor(
            claims, settings=self._settings, store=self._store, bus=self._bus, log_id=log_id,
            journal=self._journal,
        )
        self._live[(claims.org_id, claims.session_id)] = actor
        return actor

    async def _host(self, actor: SessionActor) -> None:
        key = (actor.org_id, actor.session_id)
        try:
            await actor.run()
            if self.fleet is not None and actor.summary is not None:
                await self.fleet.finished(actor.key)
            if actor.summary is None and not actor.handed_over and self._journal is not None:
                # Finalisation raised (a bug). Until the next start resumes it from
                # disk, the session must neither start afresh nor claim a summary.
                self._hold_unfinished(key, recorded=actor.end_recorded)
        finally:
            # Runs on cancellation too, so the registry never keeps a dead actor.
            self._unregister(actor)
            if actor.moved and self.fleet is not None:
                self.fleet.lost += 1
            # No checkpoint since leaving the live set: a scrape never sees its
            # skipped batches twice or not at all.
            self.skipped_ended += actor.skipped
            if actor.summary is not None:
                self._remember(key, actor.summary)
                if actor.end_reason == "actor_error":
                    self.crashed += 1
                reason = str(actor.summary["end_reason"])
                self.ended_by_reason[reason] = self.ended_by_reason.get(reason, 0) + 1
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

    async def _finish_empty(self, key: str, entry: Ended, log_id: str) -> None:
        """Record, publish and keep an empty session's summary, retrying every step
        until done; only ``trio.Cancelled`` escapes (then the next start resumes it
        from the ``publish`` state, or it was never recorded)."""
        assert self._journal is not None and entry.summary is not None
        journal, state = self._journal, {"step": "publish", "summary": entry.summary}
        try:
            await retry(lambda: journal.set_state(key, state), "recording the end", log_id,
                        None, entry.backoff)
            entry.recorded = True
            await publish_and_close(self._bus, journal, key, entry.summary, log_id,
                                    entry.backoff)
            entry.stored.set()
            if self.fleet is not None:
                await self.fleet.finished(key)
        finally:
            self._publishing.discard(entry)

    def _remember(self, key: Key, summary: dict[str, Any]) -> None:
        self._put(key, Ended(summary, trio.current_time() + self._settings.ended_retention_s,
                              stored_event()))

    def _hold_unfinished(self, key: Key, *, recorded: bool) -> None:
        """Hold a session whose state is on disk but not in an actor here (its log
        could not be replayed, or its finalisation raised) until a later start takes
        it up: its requests are answered "retry", or "ended" once ``recorded``."""
        self._put(key, Ended(None, trio.current_time() + self._settings.ended_retention_s,
                             trio.Event(), recorded=recorded))

    def _put(self, key: Key, entry: Ended) -> None:
        self._ended.put(key, entry)

    def _entry(self, key: Key) -> Ended | None:
        return self._ended.get(key)
