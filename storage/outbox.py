"""A durable outbox in front of any :class:`~storage.bus.Bus`.

:meth:`Outbox.publish` writes the event to disk (temp file, fsync, rename,
directory fsync) and returns: from then on the event survives a crash. A delivery
task (:meth:`Outbox.run`, in the root nursery) sends the events through the
wrapped bus one at a time, oldest first, and deletes each file only after the bus
accepted it. If the Core API or the sink is down, events wait on disk and are
delivered when it is back, after a restart too. The Outbox is itself a Bus
(``publish``, ``aclose``), so an actor can use it as its bus.

Files under ``root``::

    pending/<name>.json    {"v": 1, "seq": <ns>, "event_id": ..., "event": {...}}
    pending/.<name>.tmp    only after a crash mid-publish; removed on start-up
    dead/<name>.json       given up: the same document plus "attempts" and "last_error"
    dead/<name>.corrupt    a pending file that did not parse (cannot happen short of
                           disk corruption: files are renamed into place)

``<name>`` is a file-safe form of ``event["event_id"]`` plus a hash of it, so one
event id is one file: publishing an id that is already pending changes nothing
(the first document wins; the receiver is idempotent on event_id anyway), and
returns once that file is durable. An id published again after its delivery is
queued and delivered again, which the receiver's idempotency makes harmless.

Delivery is at least once and in publish order: a failed delivery (any Exception
from the bus, BusError or not) is retried after an exponential backoff
(``base_delay_s`` doubling per failure, capped at ``max_delay_s``, with "equal
jitter": half fixed, half random), and events behind it wait, so an outage does
not reorder them. The bus protocol cannot tell a malformed event from an outage,
so an event that has failed ``max_attempts`` times in a row (default 50: 22 to
44 minutes with the default delays) is moved to ``dead/`` and counted (``dead``), and
delivery moves on; an operator can move it back into ``pending/`` and restart.
Attempt counts live in memory and restart from 0 after a restart. A crash after
the bus accepted an event but before its file was deleted delivers it again.

Cancellation: a cancelled ``publish`` raises ``Cancelled``; its event may or may
not have been written (if written, it will be delivered). Cancelling ``run``
stops delivery; an event being delivered stays on disk and is delivered again on
the next start. ``trio.Cancelled`` is never swallowed. Disk errors in ``publish``
raise :class:`BusError` (the caller keeps the event and retries, as with any bus).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from storage.bus import Bus, BusError
from storage.fsutil import fsync_dir

__all__ = ["Outbox"]

log = logging.getLogger("telemetry.outbox")
T = TypeVar("T")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def event_file_name(event_id: str) -> str:
    """The file-safe, collision-free name of an event id (no suffix)."""
    safe = _UNSAFE.sub("_", event_id)[:80].lstrip("._-") or "e"
    return f"{safe}.{hashlib.sha256(event_id.encode()).hexdigest()[:16]}"


def _tag(name: str) -> str:
    """What log lines carry: the hash part only (event ids name sessions)."""
    return "e_" + name.rsplit(".", 1)[-1]


@dataclass(eq=False)
class _Entry:
    name: str
    seq: int
    attempts: int = 0


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
        rng: random.Random | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self._pending = self.root / "pending"
        self._dead = self.root / "dead"
        self._bus = bus
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(2)
        self._base, self._cap = base_delay_s, max_delay_s
        self._max_attempts = max(1, max_attempts)
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[int, str]] = []  # (seq, name); stale pairs are skipped
        self._writing: dict[str, trio.Event] = {}
        self._wakeup = trio.Event()
        self._last_seq = 0
        self._closed = False
        self._dirs_ready = False
        self._run_scope: trio.CancelScope | None = None
        self._counts = dict(delivered=0, failures=0, dead=0, corrupt=0)

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
            return
        seq = self._last_seq = max(time.time_ns(), self._last_seq + 1)
        try:
            doc = json.dumps({"v": 1, "seq": seq, "event_id": event_id, "event": dict(event)},
                             separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise BusError(f"event is not JSON-serialisable: {e}") from e
        done = self._writing[name] = trio.Event()
        try:
            await self._thread(self._write_pending, name, doc)
            self._add(_Entry(name, seq))  # no checkpoint since the write returned
        except OSError as e:
            raise BusError(f"outbox write failed: {e.strerror}") from e
        finally:
            del self._writing[name]
            done.set()

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
        :meth:`aclose` (then it returns). Never raises for a delivery failure."""
        entries, corrupt = await self._thread(self._load)
        self._counts["corrupt"] += corrupt
        for entry in entries:
            if entry.name not in self._entries and entry.name not in self._writing:
                self._add(entry)
        with trio.CancelScope() as self._run_scope:
            task_status.started()
            if self._closed:
                return
            while True:
                entry = self._head()
                if entry is None:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                await self._deliver(entry)

    async def _deliver(self, entry: _Entry) -> None:
        tag = _tag(entry.name)
        try:
            event = await self._thread(self._read_pending, entry.name)
        except FileNotFoundError:  # removed by hand
            self._drop(entry)
            return
        except (ValueError, KeyError, TypeError):
            log.error("outbox event %s does not parse; moving it to dead/", tag)
            self._counts["corrupt"] += 1
            self._drop(entry)
            await self._thread(self._quarantine, entry.name)
            return
        except OSError as e:
            await self._failed(entry, e)
            return
        try:
            await self._bus.publish(event)
        except Exception as e:  # trio.Cancelled is not an Exception: it propagates
            await self._failed(entry, e)
            return
        self._counts["delivered"] += 1
        try:
            # Still listed while its file is deleted, so a concurrent publish of the
            # same id cannot write a file that this unlink would then remove.
            await self._thread(_unlink, self._pending / f"{entry.name}.json")
        except OSError as e:
            log.error("outbox could not delete delivered event %s (%s); it will be "
                      "delivered again after a restart", tag, e.strerror)
        self._drop(entry)

    async def _failed(self, entry: _Entry, exc: Exception) -> None:
        entry.attempts += 1
        self._counts["failures"] += 1
        tag = _tag(entry.name)
        if entry.attempts >= self._max_attempts:
            log.error("outbox gives up on event %s after %d attempts (%s); moved to dead/",
                      tag, entry.attempts, type(exc).__name__)
            try:
                await self._thread(self._bury, entry.name, entry.attempts,
                                   f"{type(exc).__name__}: {exc}")
            except OSError as e:
                log.error("outbox could not move %s to dead/ (%s); retrying it", tag, e.strerror)
                entry.attempts = 0
                await trio.sleep(self.retry_delay(1))
                return
            self._counts["dead"] += 1
            self._drop(entry)
            return
        delay = self.retry_delay(entry.attempts)
        log.warning("outbox delivery of %s failed (attempt %d/%d: %s); retry in %.1f s",
                    tag, entry.attempts, self._max_attempts, type(exc).__name__, delay)
        await trio.sleep(delay)

    def retry_delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure in a row of one event:
        ``d = min(max_delay_s, base_delay_s * 2**(attempts-1))``, then a uniformly
        random point of ``[d/2, d]``."""
        d = min(self._cap, self._base * 2.0 ** min(attempts - 1, 62))
        return d / 2 + self._rng.uniform(0, d / 2)

    # -- queue -----------------------------------------------------------------------

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.name] = entry
        heapq.heappush(self._heap, (entry.seq, entry.name))
        self._last_seq = max(self._last_seq, entry.seq)
        self._wakeup.set()

    def _head(self) -> _Entry | None:
        while self._heap:
            seq, name = self._heap[0]
            entry = self._entries.get(name)
            if entry is not None and entry.seq == seq:
                return entry
            heapq.heappop(self._heap)
        return None

    def _drop(self, entry: _Entry) -> None:
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]

    # -- files (worker threads) ----------------------------------------------------------

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _ensure_dirs(self) -> None:
        if not self._dirs_ready:
            for d in (self._pending, self._dead):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(self.root)
            self._dirs_ready = True

    def _write_pending(self, name: str, doc: bytes) -> None:
        self._ensure_dirs()
        _atomic_write(self._pending, name + ".json", doc)

    def _read_pending(self, name: str) -> Mapping[str, Any]:
        doc = json.loads((self._pending / f"{name}.json").read_bytes())
        event = doc["event"]
        if not isinstance(event, dict):
            raise TypeError("event is not an object")
        return event

    def _bury(self, name: str, attempts: int, error: str) -> None:
        src = self._pending / f"{name}.json"
        doc = json.loads(src.read_bytes())
        doc.update(attempts=attempts, last_error=error[:2000])
        _atomic_write(self._dead, name + ".json", json.dumps(doc).encode())
        _unlink(src)

    def _quarantine(self, name: str) -> None:
        """Move an unparsable pending file to dead/; if that fails it stays where it
        is and is found again at the next start."""
        with contextlib.suppress(OSError):
            os.replace(self._pending / f"{name}.json", self._dead / f"{name}.corrupt")
            fsync_dir(self._dead)
            fsync_dir(self._pending)

    def _load(self) -> tuple[list[_Entry], int]:
        """Pending events sorted by seq; stale temp files removed; unparsable files
        moved to dead/ and counted."""
        self._ensure_dirs()
        entries, corrupt = [], 0
        for path in self._pending.iterdir():
            if path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if not path.name.endswith(".json"):
                continue
            name = path.name[: -len(".json")]
            try:
                doc = json.loads(path.read_bytes())
                seq = int(doc["seq"])
                if not isinstance(doc["event"], dict):
                    raise TypeError("event is not an object")
            except (ValueError, KeyError, TypeError):
                log.error("outbox event %s does not parse; moved to dead/", _tag(name))
                self._quarantine(name)
                corrupt += 1
                continue
            entries.append(_Entry(name, seq))
        entries.sort(key=lambda e: (e.seq, e.name))
        return entries, corrupt


def _atomic_write(directory: Path, filename: str, data: bytes) -> None:
    """temp file, fsync, rename onto ``filename``, fsync the directory."""
    tmp = directory / f".{filename}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:  # events carry patient ids: owner-only files
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
