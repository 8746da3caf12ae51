"""Fleet mode: which instance owns a live session, and how a journal keeps a former
owner from writing.

Two mechanisms, both on the journal's engine (NATS JetStream; ``docs/fleet.md``):

* **Ownership records** (:class:`Ownership`): one record per session naming its
  owner instance, changed only by compare-and-set, and one heartbeat per instance
  with an expiry. A session's lease is its owner's heartbeat: when the owner stops
  renewing it (the process died, the host was lost) the lease has expired and any
  instance may claim the session. A request for a session this instance does not own
  *steals* it (``claim(steal=True)``): the router decides where a session should be,
  never whether it may continue.
* **Fencing** (:class:`FencedJournal`): the records are advisory; what makes two
  owners harmless is the journal. :meth:`FencedJournal.take_over` replays the
  session and appends an owner mark *conditional on the session's last record being
  the one it replayed*; every later write of this instance is conditional on its own
  previous one. A former owner's next write therefore fails with
  :class:`SessionMoved`, and nothing it acknowledges afterwards can be missing from
  the new owner's replay. So every acknowledged batch ends up in the one blob, and
  only one end mark can be recorded after the last take-over.

Errors: both raise :class:`storage.journal.JournalError` subclasses only;
cancellation propagates, and a cancelled write may or may not have taken effect
(fencing makes that safe: the next write finds out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from storage.journal import Journal, JournalError, Record


class SessionMoved(JournalError):
    """A fenced write was refused: another instance took the session over since this
    one last wrote. Nothing was written; this instance must stop the session's
    actor without finalising it (the new owner carries it on)."""


class ClaimLost(JournalError):
    """Another instance changed the session's ownership record at the same moment;
    nothing was claimed. Ask again shortly."""


@dataclass(frozen=True)
class TakeOver:
    """A session as the journal holds it when this instance took it over: its
    records in order (owner marks and state records left out) and its last state
    (None if it has none): the same as :meth:`Journal.replay` and
    :meth:`Journal.state`, read in one consistent pass."""

    records: list[Record]
    state: dict[str, Any] | None


class FencedJournal(Journal, Protocol):
    """A journal whose session writes are fenced (see the module docstring)."""

    async def take_over(self, key: str) -> TakeOver:
        """Replay ``key`` and make this instance its only writer from here on.
        Raises :class:`ClaimLost` if other writers kept racing it, or the journal's
        errors; the records are then not claimed (a later call starts over)."""
        ...


@dataclass(frozen=True)
class Owner:
    """A session's ownership record: ``instance`` ("" once released by a
    passivating owner) since ``since`` (wall clock, seconds)."""

    instance: str
    since: float


@dataclass
class Survey:
    """Every session's ownership record and the instances alive now (heartbeat not
    expired), read at one moment."""

    owners: dict[str, Owner] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)

    def orphaned(self, key: str, now: float, grace_s: float) -> bool:
        """No live instance serves ``key``: its owner's lease expired, or it was
        released more than ``grace_s`` ago and nobody claimed it since."""
        owner = self.owners.get(key)
        if owner is None:
            return False
        if owner.instance:
            return owner.instance not in self.alive
        return now - owner.since >= grace_s


class Ownership(Protocol):
    """Ownership records and instance heartbeats (see the module docstring). Keys are
    the journal's session keys (``org/session``)."""

    instance: str

    async def heartbeat(self) -> None:
        """Renew this instance's lease (its heartbeat with an expiry)."""
        ...

    async def leave(self) -> None:
        """Delete this instance's heartbeat: its sessions are orphaned at once."""
        ...

    async def claim(self, key: str, *, steal: bool) -> bool:
        """Make this instance ``key``'s owner. A record that names a live instance is
        taken only with ``steal``; False if it was not taken. Raises
        :class:`ClaimLost` when another claim raced this one."""
        ...

    async def owner(self, key: str) -> Owner | None:
        """``key``'s record, None if it has none."""
        ...

    async def release(self, key: str) -> None:
        """Passivation: mark ``key`` as owned by nobody since now, if this instance
        still owns it (else nothing)."""
        ...

    async def forget(self, key: str) -> None:
        """Delete ``key``'s record (the session is finalised), if this instance
        still owns it."""
        ...

    async def survey(self) -> Survey:
        """Every record and the live instances."""
        ...
