"""Fleet mode: sessions that move between instances (``docs/fleet.md``).

:class:`FleetSessions` is the host's half of the ownership protocol of
:mod:`storage.ownership`, given a fenced journal and the ownership records:

* **Take-over on demand** (:meth:`FleetSessions.acquire`): a request for a session
  that has no actor here claims its ownership record (stealing it from a live owner:
  the router chooses where a session runs, never whether it may), then
  :meth:`~storage.ownership.FencedJournal.take_over` replays its log and fences out
  the former owner, and the actor is rebuilt through the recovery code paths
  (:func:`actors.recovery.restore`), so its metrics equal an uninterrupted run's.
  Concurrent requests for one session wait for the one take-over. A session whose
  end is recorded and whose owner is alive is left to that owner (its batches are
  refused as ended; its end call is told to ask again).
* **The sweep** (:meth:`FleetSessions.run`): the instance's heartbeat every
  ``lease_s / 3``; every ``sweep_s``, a survey of the ownership records that stops
  any actor here whose session another instance took (:meth:`SessionActor.lose`:
  no finalisation), and claims orphans (owner's lease expired, or released by a
  passivating owner more than ``orphan_grace_s`` ago) without stealing, so that a
  session nobody resumes still ends by idle timeout or maximum duration.
* **Passivation** (:meth:`FleetSessions.passivate`, from the host's drain): the
  actors were handed over; their records are released and the heartbeat deleted,
  so the next request anywhere takes them over at once.

Errors: storage failures of the sweep are logged and retried at the next sweep;
those of :meth:`acquire` propagate (the request is answered 503 + Retry-After).
Cancellation propagates everywhere; an interrupted take-over leaves nothing half
done that the next one would not redo (the fence and the records are idempotent).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Literal, Protocol, cast

import trio

from actors.durable import ended_key, session_key
from actors.ended import Key
from actors.limits import ActorLimits
from actors.session import SessionActor
from storage.journal import JournalError, Record
from storage.ownership import FencedJournal, Ownership

log = logging.getLogger("telemetry.fleet")

ENDING = ("upload", "publish")
# How many orphans one sweep claims at most: the rest wait for the next sweep (or
# another instance), so a lost instance's sessions spread over the survivors.
CLAIMS_PER_SWEEP = 50
ELSEWHERE: Literal["elsewhere"] = "elsewhere"
Acquired = SessionActor | None | Literal["elsewhere"]


class Host(Protocol):
    """What fleet mode needs of its host (:class:`actors.hosting.ActorHost`)."""

    settings: ActorLimits

    @property
    def accepting(self) -> bool: ...
    def live(self) -> list[SessionActor]: ...
    def live_actor(self, key: Key) -> SessionActor | None: ...
    def known_ended(self, key: Key) -> bool: ...
    def remember(self, org_id: str, session_id: str, summary: dict[str, Any],
                 ttl_s: float) -> None: ...
    def resume_publish(self, key: str, summary: dict[str, Any]) -> None: ...
    def rebuild(self, records: list[Record], end_reason: str | None) -> SessionActor: ...
    def launch(self, actor: SessionActor) -> None: ...


class FleetSessions:
    """Ownership for one host (see the module docstring)."""

    def __init__(self, host: Host, journal: FencedJournal, ownership: Ownership, *,
                 lease_s: float, orphan_grace_s: float, sweep_s: float) -> None:
        self._host = host
        self._journal = journal
        self._ownership = ownership
        self.lease_s = lease_s
        self.orphan_grace_s = orphan_grace_s
        self.sweep_s = sweep_s
        self._acquiring: dict[Key, trio.Event] = {}
        # Cumulative figures for the metrics and the admin view.
        self.take_overs = 0
        self.take_over_seconds = 0.0
        self.lost = 0
        self.orphans_claimed = 0
        self.sweep_failures = 0

    @property
    def instance(self) -> str:
        return self._ownership.instance

    # -- take-over ------------------------------------------------------------------

    async def acquire(self, key: Key, *, steal: bool = True) -> Acquired:
        """Own ``key`` here and return its live actor, rebuilt from the journal.

        Returns None if the session has no log (new: the caller starts it) or once
        it is known here as ended (the host's ended registry holds it), and
        :data:`ELSEWHERE` if its end is recorded and a live owner is finishing it
        (or, without ``steal``, if a live instance owns it). Raises the journal's
        errors (:class:`storage.journal.JournalError`, ``ClaimLost`` among them)."""
        while (busy := self._acquiring.get(key)) is not None:
            await busy.wait()
            actor = self._host.live_actor(key)
            if actor is not None:
                return actor
            if self._host.known_ended(key):
                return None
        done = self._acquiring[key] = trio.Event()
        try:
            return await self._acquire(key, steal)
        finally:
            del self._acquiring[key]
            done.set()

    async def _acquire(self, key: Key, steal: bool) -> Acquired:
        host, journal = self._host, self._journal
        skey = session_key(*key)
        if await self._kept_ended(key):
            return None
        state = await journal.state(skey) or {}
        ending = state.get("step") in ENDING
        if not await self._ownership.claim(skey, steal=steal and not ending):
            return ELSEWHERE
        started = time.perf_counter()
        taken = await journal.take_over(skey)
        if not taken.records:
            if state.get("step") == "publish":  # ended empty: its log never existed
                host.resume_publish(skey, state["summary"])
                return None
            # Finalised elsewhere between the first read and the claim: its log is
            # gone and its summary kept.
            await self._kept_ended(key)
            return None
        state = taken.state or {}
        if state.get("step") == "publish":
            host.resume_publish(skey, state["summary"])
            return None
        ended = str(state.get("end_reason") or "client_end") \
            if state.get("step") == "upload" else None
        try:
            actor = host.rebuild(taken.records, ended)
        except ValueError as exc:
            raise JournalError("the session's log does not start with its claims") from exc
        host.launch(actor)
        elapsed = time.perf_counter() - started
        self.take_overs += 1
        self.take_over_seconds += elapsed
        log.info("session taken over", extra={
            "session": actor.log_id, "records": len(taken.records),
            "seconds": round(elapsed, 3)})
        return actor

    async def _kept_ended(self, key: Key) -> bool:
        """Whether the fleet keeps the session's summary as ended (``ended/<key>``);
        if so the host holds it too, for the rest of its retention."""
        kept = await self._journal.state(ended_key(session_key(*key)))
        if kept is None or not isinstance(kept.get("summary"), dict):
            return False
        age = time.time() - float(kept.get("ended_wall", 0))
        self._host.remember(key[0], key[1], kept["summary"],
                            max(0.0, self._host.settings.ended_retention_s - age))
        return True

    # -- the sweep -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Heartbeat and sweep until cancelled (see the module docstring)."""
        await self._beat()
        task_status.started()
        next_sweep = trio.current_time() + self.sweep_s * random.uniform(0.5, 1.0)
        while True:
            await trio.sleep(self.lease_s / 3)
            await self._beat()
            if trio.current_time() >= next_sweep:
                next_sweep = trio.current_time() + self.sweep_s * random.uniform(0.8, 1.2)
                try:
                    await self.sweep()
                except JournalError as exc:
                    self.sweep_failures += 1
                    log.warning("fleet sweep failed: %s", type(exc).__name__)

    async def _beat(self) -> None:
        try:
            await self._ownership.heartbeat()
        except JournalError as exc:
            log.warning("heartbeat failed: %s", type(exc).__name__)

    async def sweep(self) -> None:
        """Stop actors whose session moved; claim orphans (at most
        :data:`CLAIMS_PER_SWEEP`, in random order)."""
        survey = await self._ownership.survey()
        me = self.instance
        for actor in self._host.live():
            owner = survey.owners.get(actor.key)
            if owner is not None and owner.instance != me and not actor.moved:
                actor.lose()
        if not self._host.accepting:
            return
        now = time.time()
        orphans = [k for k in survey.owners if survey.orphaned(k, now, self.orphan_grace_s)]
        random.shuffle(orphans)
        for skey in orphans[:CLAIMS_PER_SWEEP]:
            org_id, session_id = skey.split("/")
            key = (org_id, session_id)
            if self._host.live_actor(key) is not None:
                continue
            got = await self.acquire(key, steal=False)
            if got is ELSEWHERE:
                continue
            self.orphans_claimed += 1
            if got is None and self._host.live_actor(key) is None:
                # A record left over after the session's end, or of a session that
                # never wrote its log: nothing to carry on.
                await self._ownership.forget(skey)

    # -- the admin view -----------------------------------------------------------------

    async def listing(self) -> dict[str, Any]:
        """The whole fleet's sessions by owner, from the ownership records (ids and
        owners only; each instance's own figures are on its admin list)."""
        survey = await self._ownership.survey()
        sessions = [{"org_id": k.split("/")[0], "session_id": k.split("/")[1],
                     "owner": o.instance or None,
                     "owner_alive": o.instance in survey.alive}
                    for k, o in sorted(survey.owners.items())]
        return {"instance": self.instance, "instances": sorted(survey.alive),
                "sessions": sessions, "count": len(sessions)}

    async def find(self, session_id: str, org_id: str | None = None) -> list[Key]:
        """Keys of the fleet's sessions with this id (in ``org_id`` if given)."""
        survey = await self._ownership.survey()
        keys = [cast(Key, tuple(k.split("/"))) for k in survey.owners]
        return sorted(k for k in keys if k[1] == session_id
                      and (org_id is None or k[0] == org_id))

    # -- ends ------------------------------------------------------------------------

    async def finished(self, key: str) -> None:
        """A session finished here (finalised, or its summary published): its
        ownership record goes (best effort: a record left over names a session with
        no log, which a later claim finds empty and deletes)."""
        try:
            await self._ownership.forget(key)
        except JournalError as exc:
            log.warning("ownership record not deleted: %s", type(exc).__name__)

    async def passivate(self, actors: list[SessionActor]) -> None:
        """Release the records of the actors handed over at shutdown, then leave the
        fleet (heartbeat deleted). Bounded by the caller's deadline."""
        for actor in actors:
            if actor.handed_over and not actor.moved:
                try:
                    await self._ownership.release(actor.key)
                except JournalError as exc:
                    log.warning("ownership record not released: %s", type(exc).__name__)
        try:
            await self._ownership.leave()
        except JournalError as exc:
            log.warning("could not leave the fleet: %s", type(exc).__name__)
