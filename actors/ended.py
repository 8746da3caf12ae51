"""Sessions that ended here: their summaries, kept for a while.

The supervisor keeps an ended session's summary for ``ended_retention_s`` to answer
repeated end calls with the same summary and late batches with 409; a session
being finished without an actor (recovered at ``publish``, or ended empty) is held
here too, unstored until its summary is. Pure bookkeeping on the Trio clock: no
I/O, no checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.backoff import Backoff

Key = tuple[str, str]  # (org_id, session_id)


@dataclass(eq=False)
class Ended:
    """A session that ended here (or is being finished without an actor)."""

    # None: its finalisation failed with a bug; the next start resumes it from disk.
    summary: dict[str, Any] | None
    expires: float
    # Set once ``summary`` may be answered with 200: blob stored, event in the outbox.
    stored: trio.Event
    # The end is durable: batches are refused with 409 (else 503, retry).
    recorded: bool = True
    # Set with ``stored`` when finishing it failed and nothing was recorded.
    failed: bool = False
    # Paces a task still finishing it; an end call kicks it (storage may be back).
    backoff: Backoff = field(default_factory=Backoff)


def stored_event() -> trio.Event:
    """An event already set: the summary is stored."""
    event = trio.Event()
    event.set()
    return event


class EndedRegistry:
    """Ended sessions by key, oldest first; an entry past ``expires`` is dropped
    whenever the registry is read or written."""

    def __init__(self) -> None:
        self._ended: OrderedDict[Key, Ended] = OrderedDict()

    def put(self, key: Key, entry: Ended) -> None:
        self._ended[key] = entry
        self._ended.move_to_end(key)
        self._expire()

    def get(self, key: Key) -> Ended | None:
        self._expire()
        return self._ended.get(key)

    def discard(self, key: Key, entry: Ended) -> None:
        """Drop ``entry`` if it is still the one held for ``key``."""
        if self._ended.get(key) is entry:
            del self._ended[key]

    def find(self, session_id: str, org_id: str | None = None) -> list[Key]:
        self._expire()
        return [k for k in self._ended if k[1] == session_id
                and (org_id is None or k[0] == org_id)]

    def _expire(self) -> None:
        now = trio.current_time()
        while self._ended:
            key, ended = next(iter(self._ended.items()))
            if ended.expires > now:
                break
            del self._ended[key]
