"""The journal: what the session actors need of durable per-session storage.

Admission makes each batch durable here before it is acknowledged; finalisation
records its progress here; a new process replays it to carry the sessions on
(``docs/durability.md``). A session is named by a key ``"org/session"`` (1-4
``/``-separated safe segments); ``ended/org/session`` keys keep ended summaries.

:class:`storage.spool.Spool` (local disk, group-committed fsync) is the first
adapter; a replicated one (NATS JetStream) is to follow. An adapter satisfies
:class:`Journal` structurally: no registration, no base class.

Contract shared by every adapter:

* a method returns only once what it was asked to make durable is durable; else it
  raises a :class:`JournalError` (a full budget is also a
  :class:`domain.errors.StorageFull`, so callers can ask the client to retry later)
  and nothing is claimed durable;
* cancellation propagates (``trio.Cancelled``); the cancelled operation may or may
  not have taken effect, so every writer is idempotent on replay (the session
  sequencer drops duplicates by sequence number);
* a key's operations take effect in the order they were called;
* :meth:`Journal.replay` may return records whose append failed or was cancelled
  (never acknowledged), never a record cut in half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class JournalError(Exception):
    """A journal operation failed; nothing it was asked to make durable is durable.
    Every adapter's own errors derive from it, so callers map one class."""


class JournalUnavailable(JournalError):
    """The journal did not answer in time (a replicated journal electing a leader, a
    node or the network lost): expected from time to time, and transient."""


@dataclass(frozen=True)
class Record:
    """One journal record: the caller's record type and its payload."""

    kind: int
    payload: bytes


class Journal(Protocol):
    """Durable per-session storage: an append-only log and a small state per key."""

    async def append(self, key: str, kind: int, payload: bytes, *,
                     compress: bool = True) -> None:
        """Append a record to ``key``'s log; returns once it is durable.
        ``compress=False``: the payload barely compresses, do not try."""
        ...

    async def set_state(self, key: str, state: dict[str, Any]) -> None:
        """Replace ``key``'s state (a JSON object) atomically, after its earlier
        appends: how far the session's end and finalisation have got."""
        ...

    async def state(self, key: str) -> dict[str, Any] | None:
        """``key``'s state, or None if it has none (or it was unreadable)."""
        ...

    async def replay(self, key: str) -> list[Record]:
        """``key``'s intact records, in order; [] if it has no log."""
        ...

    async def sessions(self) -> list[str]:
        """Every key with a log or a state, sorted (start-up)."""
        ...

    async def remove(self, key: str) -> None:
        """Delete ``key``'s log and state, after its earlier operations."""
        ...
