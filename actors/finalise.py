"""Finalisation of a session: blob stored and verified, summary event published.

With a spool, finalisation is a state machine persisted in the session's state file
(see :mod:`actors.durable`): the end mark ``upload`` → ``publish`` → ended. Each step
is idempotent (the blob bytes are a pure function of the acknowledged frames; the
event id is derived from the session), so a crash at any point resumes at that step
and nothing is seen twice. Outages delay a step, never drop it: every storage step
(the spool's state writes, the blob store, the outbox) is retried with capped
backoff until it succeeds or the task is cancelled (shutdown), and a cancelled
finalisation resumes at the next start. A retried end call cuts the current pause
short (:meth:`Backoff.kick`), so storage coming back is noticed at once.

Without a spool (unit tests, a deliberately ephemeral deployment) there is nothing
to resume from, so finalisation is shielded from cancellation and bounded in time
instead, and gives up after a few attempts, saying so in the summary.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from trio.lowlevel import RunVar

from actors.durable import ended_key, session_key
from actors.faults import maybe_die
from actors.summary import build_summary
from storage.blobs import blob_key

if TYPE_CHECKING:
    from actors.session import SessionActor

log = logging.getLogger("telemetry.finalise")

MAX_BACKOFF_S = 30.0
# Blobs built and stored at once, per process. A finalisation holds its whole blob
# in memory (about 2 MB per 30 minutes of frames) while it is built, stored and
# verified; a mass end (shutdown with TELEMETRY_SHUTDOWN_MODE=finalise, or hundreds
# of sessions ending together) built them all at once: a 100-session soak peaked at
# 515 MB. The work is CPU-bound on one event loop anyway, so a few at a time finish
# the batch as soon, in bounded memory.
FINALISE_CONCURRENCY = 4
_BLOB_SLOTS: RunVar[trio.CapacityLimiter] = RunVar("telemetry_blob_slots")


def blob_slots() -> trio.CapacityLimiter:
    """The run's limiter on blobs being built and stored (one per Trio run, like
    trio's own default thread limiter)."""
    try:
        return _BLOB_SLOTS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(FINALISE_CONCURRENCY)
        _BLOB_SLOTS.set(limiter)
        return limiter


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
    cancellation propagates, whether raised by ``fn`` or during a pause."""
    attempt = 0
    while True:
        try:
            result = await fn()
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


def _metrics(actor: SessionActor) -> dict[str, Any] | None:
    if actor.reps is None:
        return None
    try:
        actor.reps.finish()
        return actor.reps.summary()
    except Exception as exc:
        log.exception("rep engine failed at finish", extra={"session": actor.log_id})
        actor.error = f"{type(exc).__name__}: {exc}"
        actor.end_reason = "actor_error"
        return None


async def _summary(actor: SessionActor, attempts: int | None) -> dict[str, Any]:
    rep_summary = _metrics(actor)
    blob: dict[str, Any] | None = None
    if actor.replay is not None and actor.replay.frame_count:
        async with blob_slots():
            data = actor.replay.finish()
            key = blob_key(actor.org_id, actor.session_id)
            ok, info = await retry(lambda: actor.store.put(key, data), "blob put",
                                   actor.log_id, attempts, actor.backoff)
            # Not held while the session waits for the bus: the blob is stored (or,
            # with attempts exhausted, given up and said so in the summary).
            del data
            actor.replay.release()
        if ok:
            blob = {"key": info.key, "size": info.size, "sha256": info.sha256,
                    "encoding": actor.replay.encoding}
        else:
            actor.error = actor.error or "blob store unavailable"
    summary = build_summary(
        claims=actor.claims, space=actor.space, started_wall=actor.started_wall,
        ended_wall=time.time(), end_reason=actor.end_reason or "client_end", blob=blob,
        stats=actor.stats, skipped=actor.skipped, duplicates=actor.duplicates,
        reps=rep_summary, error=actor.error,
    )
    actor.add_media(summary, rep_summary)
    return summary


async def publish_and_close(actor_bus: Any, spool: Any, key: str, summary: dict[str, Any],
                            log_id: str, backoff: Backoff | None = None) -> None:
    """The last two steps, shared with recovery of a session found at ``publish``.

    Every step is retried until it succeeds, so this returns only once the event is
    in the outbox, the summary is kept under :func:`ended_key` and the session's log
    is gone; it raises only ``trio.Cancelled`` (the state file still says
    ``publish``: the next start does this again, idempotently)."""
    await retry(lambda: actor_bus.publish(summary), "publish", log_id, None, backoff)
    maybe_die("after_publish")
    summary["published"] = True
    # Kept for the retention period so late batches and repeated end calls are answered
    # right after a restart too; under its own key, since remove() takes the log and
    # the session's state file together.
    kept = {"summary": summary, "ended_wall": time.time()}
    await retry(lambda: spool.set_state(ended_key(key), kept), "keeping the summary",
                log_id, None, backoff)
    maybe_die("before_remove")
    await retry(lambda: spool.remove(key), "removing the spool log", log_id, None, backoff)


async def record_end(actor: SessionActor) -> None:
    """Make the session's end durable (the ``upload`` step's state file), retrying
    until it is; a no-op without a spool or when recovery found it recorded.

    Until this returns the session is ending only in memory: batches are answered
    503 (retry), not 409, and a crash brings the session back live, as its disk
    says. Raises only ``trio.Cancelled`` (then the end is not recorded)."""
    if actor.spool is None or actor.end_recorded:
        actor.mark_end_recorded()
        return
    spool = actor.spool
    key = session_key(actor.org_id, actor.session_id)
    state = {"step": "upload", "end_reason": actor.end_reason}
    await retry(lambda: spool.set_state(key, state), "recording the end", actor.log_id,
                None, actor.backoff)
    actor.mark_end_recorded()


async def finalise(actor: SessionActor) -> dict[str, Any]:
    """Run (or resume) finalisation after :func:`record_end`; return the summary.

    With a spool it returns only once the blob is stored and the event is in the
    outbox (storage failures are retried, see the module docstring); it raises
    ``trio.Cancelled`` (resumed at the next start) or, for a bug, the exception."""
    try:
        return await _finalise(actor)
    finally:
        # The blob is stored (or, on cancellation, will be rebuilt from the spool).
        actor.spill_path.unlink(missing_ok=True)


async def _finalise(actor: SessionActor) -> dict[str, Any]:
    spool = actor.spool
    if spool is None:
        return await _finalise_ephemeral(actor)
    key = session_key(actor.org_id, actor.session_id)
    maybe_die("upload")
    summary = await _summary(actor, attempts=None)
    maybe_die("after_upload")
    publishing = {"step": "publish", "summary": summary}
    await retry(lambda: spool.set_state(key, publishing), "recording the summary",
                actor.log_id, None, actor.backoff)
    await publish_and_close(actor.bus, spool, key, summary, actor.log_id, actor.backoff)
    return summary


async def _finalise_ephemeral(actor: SessionActor) -> dict[str, Any]:
    summary: dict[str, Any] | None = None
    with trio.move_on_after(actor.settings.shutdown_deadline_s) as scope:
        scope.shield = True
        summary = await _summary(actor, attempts=4)
        ok, _ = await retry(lambda: actor.bus.publish(summary), "publish", actor.log_id, 4)
        summary["published"] = ok
    if scope.cancelled_caught or summary is None:
        log.error("finalisation timed out", extra={"session": actor.log_id})
        summary = build_summary(
            claims=actor.claims, space=actor.space, started_wall=actor.started_wall,
            ended_wall=time.time(), end_reason=actor.end_reason or "shutdown", blob=None,
            stats=actor.stats, skipped=actor.skipped, duplicates=actor.duplicates, reps=None,
            error="finalisation timed out",
        )
        summary["published"] = False
    return summary
