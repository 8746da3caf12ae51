"""A durable outbox in front of any :class:`~storage.bus.Bus`.

:meth:`Outbox.publish` writes the event to disk (temp file, fsync, rename,
directory fsync) and returns: from then on the event survives a crash. A delivery
task (:meth:`Outbox.run`, in the root nursery) sends the events through the
wrapped bus, oldest first, up to ``concurrency`` at a time (one per session), and
deletes each file only after the bus accepted it. If the Core API or the sink is
down, events wait on disk and are delivered when it is back, after a restart too.
The Outbox is itself a Bus (``publish``, ``aclose``), so an actor can use it as its
bus.

Events are files under ``root`` (``pending/``, ``dead/``; see
:mod:`storage.outbox_files`), named by a file-safe form of ``event["event_id"]``
plus a hash of it, so one event id is one file: publishing an id that is already
pending changes nothing (the first document wins; the receiver is idempotent on
event_id anyway), and returns once that file is durable. An id published again after its delivery is
queued and delivered again, which the receiver's idempotency makes harmless.

Delivery is at least once, and in publish order *within a session*: events are
keyed by the event's ``org_id`` and ``session_id`` (by ``event_id`` if it has
neither), and an event is only sent once every earlier event of its key has been
delivered or set aside. Events of different keys do not wait for each other: one
event that keeps failing holds up only the later events of its own session.

* :class:`~storage.bus.EventRejected` from the bus (the receiver refused *the
  event*, e.g. a 400: malformed, or text Postgres cannot store) is final: the event
  is moved to ``dead/`` at once, logged and counted (``rejected`` and ``dead``).
* Any other Exception (BusError or not: an outage, a timeout, a 5xx) is transient:
  that event is retried after an exponential backoff (``base_delay_s`` doubling per
  failure of that event, capped at ``max_delay_s``, with "equal jitter": half fixed,
  half random) while other keys are delivered. An event that has failed
  ``max_attempts`` times in a row (default 50: 22 to 44 minutes with the default
  delays) is moved to ``dead/`` and counted (``dead``), in case the receiver cannot
  say that an event is bad. An operator can move a dead event back into
  ``pending/`` and restart. Not in confirmed mode (below): there it is logged
  every ``max_attempts`` failures and retried on, at the capped backoff.
* An outage fails every event, and retrying each on its own clock would multiply
  the load on a receiver that is coming back. So failures in a row, across events,
  also pause all delivery: after the n-th (n >= 2) the pause is ``retry_delay(n-1)``,
  and any delivery the receiver answered (accepted or rejected) ends it. One
  failing event alone never pauses the others.

**Confirmed mode** (``confirm=True``, fleet mode): :meth:`Outbox.publish` returns
only once the receiver has judged the event: delivered, or refused for good
(:class:`~storage.bus.EventRejected`, then set aside in ``dead/``). The instance's
disk may be lost with the instance in a fleet, so the caller keeps its own durable
record of the event (the session's journal, replicated) until then, and a
take-over elsewhere publishes it again: the disk only spreads retries out. So a
transient failure never sets a confirmed event aside, however long it lasts (an
outage, or a 401/403 from a bad token, retried like one): ``dead/`` is on the
instance's disk, and releasing the caller then would let it drop its replicated
record of an event the receiver never took. The event is retried at the capped
backoff until the receiver takes or refuses it, or the caller is cancelled (its
record is still there; the next owner of the session publishes it again).

Attempt counts live in memory and restart from 0 after a restart. A crash after
the bus accepted an event but before its file was deleted delivers it again.

Cancellation: a cancelled ``publish`` raises ``Cancelled``; its event may or may
not have been written (if written, it will be delivered). Cancelling ``run``
stops delivery, including the deliveries in flight; an event being delivered stays
on disk and is delivered again on the next start. ``trio.Cancelled`` is never
swallowed. Disk errors in ``publish`` raise :class:`BusError` (the caller keeps the
event and retries, as with any bus).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from storage.bus import Bus, BusError, EventRejected
from storage.outbox_files import OutboxDir, event_file_name
from storage.outbox_files import log_tag as _tag

__all__ = ["Outbox", "event_file_name"]

log = logging.getLogger("telemetry.outbox")
T = TypeVar("T")
Key = tuple[str, str]  # what orders delivery: (org_id, session_id), or ("", event_id)


def ordering_key(event: Mapping[str, Any]) -> Key:
    """The events that must be delivered in publish order share this key: those of one
    session. An event without both ids is ordered only with itself (its event_id)."""
    org, sid = event.get("org_id"), event.get("session_id")
    if isinstance(org, str) and isinstance(sid, str):
        return (org, sid)
    return ("", str(event.get("event_id")))


@dataclass(eq=False)
class _Entry:
    name: str
    seq: int
    key: Key
    attempts: int = 0
    not_before: float = -math.inf  # trio clock: no retry before this


class Outbox:
    """A durable queue of bus events in front of ``bus``; see the module docstring."""

    def __init__(
        self,
        root: Path,
        bus: Bus,
        *,
        limiter: trio.CapacityLimiter | None = None,
        base_delay_s: float = 0.5,
        max_delay_s: float = 60.0,
        max_attempts: int = 50,
        concurrency: int = 4,
        rng: random.Random | None = None,
        confirm: bool = False,
    ) -> None:
        self.root = Path(root).absolute()
        self._confirm = confirm
        self._gone: dict[str, trio.Event] = {}  # confirmed publishes waiting, by name
        self._dir = OutboxDir(self.root)
        self._bus = bus
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(2)
        self._base, self._cap = base_delay_s, max_delay_s
        self._max_attempts = max(1, max_attempts)
        # Several at a time, so that one slow event (timeouts, the bus's own retries)
        # does not hold up the others; a few suffice, the receiver is one service.
        self._concurrency = max(1, concurrency)
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        # All heaps hold (seq, name) pairs, checked against _entries when popped, so
        # removing an entry needs no heap surgery. Each entry has one pair in its
        # key's heap and at most a few in _ready/_delayed, so they stay bounded.
        self._by_key: dict[Key, list[tuple[int, str]]] = {}  # per key, oldest first
        self._ready: list[tuple[int, str]] = []  # candidates to send now
        self._delayed: list[tuple[float, int, str]] = []  # (not_before, seq, name)
        self._busy: set[Key] = set()  # keys with a delivery in flight
        self._streak = 0  # transient failures in a row, across events
        # Sessions with a transient failure since the receiver last answered: an
        # outage shows as failures of several; one event failing again is its own
        # business and must not pause the others.
        self._failing_keys: set[Key] = set()
        self._pause_until = -math.inf  # trio clock: no new delivery before this
        self._writing: dict[str, trio.Event] = {}
        self._wakeup = trio.Event()
        self._last_seq = 0
        self._closed = False
        self._run_scope: trio.CancelScope | None = None
        self._counts = dict(delivered=0, failures=0, rejected=0, dead=0, corrupt=0)

    @property
    def depth(self) -> int:
        """Events on disk waiting for delivery (including one being delivered)."""
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {**self._counts, "depth": self.depth}

    # -- Bus protocol ----------------------------------------------------------------

    async def publish(self, event: Mapping[str, Any]) -> None:
        """Write ``event`` durably to ``pending/`` and queue it; see the module docstring.
        BusError if the outbox is closed, the event has no string ``event_id``, is not
        JSON-serialisable, or the disk write fails (nothing is queued then)."""
        if self._closed:
            raise BusError("outbox is closed")
        event_id = event.get("event_id") if isinstance(event, Mapping) else None
        if not isinstance(event_id, str) or not event_id:
            raise BusError("event has no event_id to name it by")
        name = event_file_name(event_id)
        while (writing := self._writing.get(name)) is not None:
            await writing.wait()  # the same id is being written: wait for its outcome
        if name in self._entries:
            await trio.lowlevel.checkpoint()
            if self._confirm:
                await self._until_gone(name)
            return
        seq = self._last_seq = max(time.time_ns(), self._last_seq + 1)
        try:
            doc = json.dumps({"v": 1, "seq": seq, "event_id": event_id, "event": dict(event)},
                             separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise BusError(f"event is not JSON-serialisable: {e}") from e
        done = self._writing[name] = trio.Event()
        try:
            await self._thread(self._dir.write_pending, name, doc)
            # no checkpoint since the write returned
            self._add(_Entry(name, seq, ordering_key(event)))
        except OSError as e:
            raise BusError(f"outbox write failed: {e.strerror}") from e
        finally:
            del self._writing[name]
            done.set()
        if self._confirm:
            await self._until_gone(name)

    async def _until_gone(self, name: str) -> None:
        """Wait until the event ``name`` has left the outbox: delivered or refused
        (in confirmed mode a transient failure never takes it out; see the module
        docstring). Cancellation raises ``Cancelled`` and leaves the event queued."""
        if name in self._entries:
            await self._gone.setdefault(name, trio.Event()).wait()

    async def aclose(self) -> None:
        """Stop delivery (events stay on disk for the next start), refuse further
        publishes, and close the wrapped bus (shielded, bounded to 10 s)."""
        self._closed = True
        if self._run_scope is not None:
            self._run_scope.cancel()
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await self._bus.aclose()

    # -- delivery --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load what is on disk, call ``started()``, then deliver until cancelled or
        :meth:`aclose` (then it returns, with the deliveries in flight cancelled).
        Never raises for a delivery failure."""
        found, corrupt = await self._thread(self._dir.load)
        self._counts["corrupt"] += corrupt
        # The key comes from the event itself: files written before keys existed
        # load unchanged.
        for entry in (_Entry(name, seq, ordering_key(event)) for name, seq, event in found):
            if entry.name not in self._entries and entry.name not in self._writing:
                self._add(entry)
        with trio.CancelScope() as self._run_scope:
            task_status.started()
            if self._closed:
                return
            async with trio.open_nursery() as nursery:
                while True:
                    now = trio.current_time()
                    entry = None
                    if len(self._busy) < self._concurrency and now >= self._pause_until:
                        entry = self._next(now)
                    if entry is not None:
                        self._busy.add(entry.key)
                        nursery.start_soon(self._deliver, entry)
                        continue  # at most `concurrency` times before waiting below
                    # No checkpoint between the checks above and the new Event: a
                    # publish or a finished delivery after them sets this one.
                    self._wakeup = trio.Event()
                    with trio.move_on_at(self._next_due(now)):
                        await self._wakeup.wait()

    async def _deliver(self, entry: _Entry) -> None:
        """One attempt at one event (a task of :meth:`run`'s nursery); then its key's
        next event, or this one again after its backoff, becomes a candidate."""
        try:
            await self._attempt(entry)
        finally:  # no checkpoint here: also runs as cancellation unwinds
            self._busy.discard(entry.key)
            head = self._key_head(entry.key)
            if head is not None:
                heapq.heappush(self._ready, (head.seq, head.name))
            self._wakeup.set()

    async def _attempt(self, entry: _Entry) -> None:
        tag = _tag(entry.name)
        try:
            event = await self._thread(self._dir.read_pending, entry.name)
        except FileNotFoundError:  # removed by hand
            self._drop(entry)
            return
        except (ValueError, KeyError, TypeError):
            log.error("outbox event %s does not parse; moving it to dead/", tag)
            self._counts["corrupt"] += 1
            self._drop(entry)
            await self._thread(self._dir.quarantine, entry.name)
            return
        except OSError as e:
            await self._failed(entry, e)
            return
        try:
            await self._bus.publish(event)
        except EventRejected as e:
            await self._rejected(entry, e)
            return
        except Exception as e:  # trio.Cancelled is not an Exception: it propagates
            await self._failed(entry, e)
            return
        self._receiver_answered()
        self._counts["delivered"] += 1
        try:
            # Still listed while its file is deleted, so a concurrent publish of the
            # same id cannot write a file that this unlink would then remove.
            await self._thread(self._dir.delete_pending, entry.name)
        except OSError as e:
            log.error("outbox could not delete delivered event %s (%s); it will be "
                      "delivered again after a restart", tag, e.strerror)
        self._drop(entry)

    def _receiver_answered(self) -> None:
        """The receiver is up (it accepted or judged an event): end any outage pause."""
        self._streak = 0
        self._failing_keys.clear()
        self._pause_until = -math.inf

    async def _rejected(self, entry: _Entry, exc: EventRejected) -> None:
        """The receiver refused the event for good: to dead/ now, not after 50 tries."""
        self._receiver_answered()
        entry.attempts += 1
        self._counts["failures"] += 1
        self._counts["rejected"] += 1
        log.error("outbox event %s rejected by the receiver (%s); moved to dead/ "
                  "without retrying", _tag(entry.name), type(exc).__name__)
        await self._give_up(entry, f"rejected: {exc}")

    async def _failed(self, entry: _Entry, exc: Exception) -> None:
        """A transient failure: back this event off (its key waits), and pause all
        delivery if failures are coming in a row (an outage)."""
        entry.attempts += 1
        self._counts["failures"] += 1
        self._streak += 1
        self._failing_keys.add(entry.key)
        now = trio.current_time()
        if self._streak >= 2 and len(self._failing_keys) >= 2:
            self._pause_until = max(self._pause_until,
                                    now + self.retry_delay(self._streak - 1))
        tag = _tag(entry.name)
        if self._confirm and entry.attempts % self._max_attempts == 0:
            # Not set aside: its publisher's replicated record waits for the receiver
            # (see "Confirmed mode" in the module docstring). Said loudly, and on.
            log.error("outbox event %s has failed %d times in a row (%s); confirmed, "
                      "so it is not set aside: still retrying", tag, entry.attempts,
                      type(exc).__name__)
        elif not self._confirm and entry.attempts >= self._max_attempts:
            log.error("outbox gives up on event %s after %d attempts (%s); moved to dead/",
                      tag, entry.attempts, type(exc).__name__)
            await self._give_up(entry, f"{type(exc).__name__}: {exc}")
            return
        delay = self.retry_delay(entry.attempts)
        entry.not_before = now + delay
        log.warning("outbox delivery of %s failed (attempt %d/%d: %s); retry in %.1f s",
                    tag, entry.attempts, self._max_attempts, type(exc).__name__, delay)

    async def _give_up(self, entry: _Entry, error: str) -> None:
        """Move the event to dead/ and count it; if that fails, retry it later."""
        try:
            await self._thread(self._dir.bury, entry.name, entry.attempts, error)
        except OSError as e:
            log.error("outbox could not move %s to dead/ (%s); retrying it",
                      _tag(entry.name), e.strerror)
            entry.attempts = 0
            entry.not_before = trio.current_time() + self.retry_delay(1)
            return
        self._counts["dead"] += 1
        self._drop(entry)

    def retry_delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure in a row of one event:
        ``d = min(max_delay_s, base_delay_s * 2**(attempts-1))``, then a uniformly
        random point of ``[d/2, d]``."""
        d = min(self._cap, self._base * 2.0 ** min(attempts - 1, 62))
        return d / 2 + self._rng.uniform(0, d / 2)

    # -- queue -----------------------------------------------------------------------

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.name] = entry
        heapq.heappush(self._by_key.setdefault(entry.key, []), (entry.seq, entry.name))
        heapq.heappush(self._ready, (entry.seq, entry.name))
        self._last_seq = max(self._last_seq, entry.seq)
        self._wakeup.set()

    def _key_head(self, key: Key) -> _Entry | None:
        """The oldest listed event of ``key``: the only one of its key that may be sent."""
        heap = self._by_key.get(key)
        while heap:
            seq, name = heap[0]
            entry = self._entries.get(name)
            if entry is not None and entry.seq == seq:
                return entry
            heapq.heappop(heap)
        self._by_key.pop(key, None)
        return None

    def _next(self, now: float) -> _Entry | None:
        """The oldest event that may be sent now: the head of its key, its key not in
        flight, its backoff over. Candidates that may not are dropped from ``_ready``
        (a stale pair; an event behind its key's head, or of a key in flight: pushed
        again when that delivery ends) or parked in ``_delayed`` (backing off)."""
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, name = heapq.heappop(self._delayed)
            heapq.heappush(self._ready, (seq, name))
        while self._ready:
            seq, name = heapq.heappop(self._ready)
            entry = self._entries.get(name)
            if (entry is None or entry.seq != seq or entry.key in self._busy
                    or self._key_head(entry.key) is not entry):
                continue
            if entry.not_before > now:
                heapq.heappush(self._delayed, (entry.not_before, seq, name))
                continue
            return entry
        return None

    def _next_due(self, now: float) -> float:
        """When :meth:`run` must look again without being woken: at the end of an
        outage pause, else when the first backoff ends (a spurious wake-up is harmless)."""
        if len(self._busy) >= self._concurrency:
            return math.inf  # a delivery ending wakes run
        if self._pause_until > now:
            return self._pause_until
        return self._delayed[0][0] if self._delayed else math.inf

    def _drop(self, entry: _Entry) -> None:
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
            gone = self._gone.pop(entry.name, None)
            if gone is not None:
                gone.set()

    # -- the directory (worker threads) --------------------------------------------------

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
