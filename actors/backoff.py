"""Retries with capped exponential backoff, and the pause an end call can cut short.

Every step of a session that talks to storage (the end mark, the blob, the bus)
retries through :func:`retry`; :class:`Backoff` lets an end call read the pause in
progress (its ``Retry-After`` hint) and end it early. Cancellation always propagates.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from storage.ownership import SessionMoved

# The finalisation steps' logger: their retry lines have always been its.
log = logging.getLogger("telemetry.finalise")

MAX_BACKOFF_S = 30.0
class Backoff:
    """The pauses between attempts of one session's finalisation steps.

    Shared by the steps so that an end call can read how long the current pause is
    (its ``Retry-After`` hint) and cut it short (:meth:`kick`: the client is asking
    again, so storage may well be back). A kick during an attempt makes the next
    pause end at once; kicks never start a second attempt in parallel."""

    def __init__(self) -> None:
        self.delay = 0.0  # the pause in progress or last taken; 0 before any failure
        self._kick = trio.Event()

    def kick(self) -> None:
        self._kick.set()

    async def pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds or until kicked. Cancellation propagates."""
        self.delay = delay
        with trio.move_on_after(delay):
            await self._kick.wait()
        if self._kick.is_set():
            self._kick = trio.Event()

    def succeeded(self) -> None:
        self.delay = 0.0


async def retry(fn: Callable[[], Awaitable[Any]], what: str, log_id: str,
                attempts: int | None, backoff: Backoff | None = None) -> tuple[bool, Any]:
    """Call ``fn`` until it succeeds (``attempts=None``: forever) with capped
    exponential backoff and jitter, paced by ``backoff`` if given (so a kick ends a
    pause early). Returns ``(ok, result)``. An exception of ``fn`` counts as a failed
    attempt and is logged by type only (messages may name the session);
    cancellation propagates, whether raised by ``fn`` or during a pause, and so does
    :class:`storage.ownership.SessionMoved` (fleet mode: the session is not this
    instance's to write any more)."""
    attempt = 0
    while True:
        try:
            result = await fn()
        except SessionMoved:
            raise  # not a failure to retry: another instance owns the session now
        except Exception as exc:
            attempt += 1
            log.warning("%s failed (attempt %d): %s", what, attempt, type(exc).__name__,
                        extra={"session": log_id})
            if attempts is not None and attempt >= attempts:
                return False, None
            delay = min(MAX_BACKOFF_S, 0.25 * math.pow(2, attempt - 1))
            delay *= random.uniform(0.8, 1.2)
            if backoff is None:
                await trio.sleep(delay)
            else:
                await backoff.pause(delay)
            continue
        if backoff is not None:
            backoff.succeeded()
        return True, result
