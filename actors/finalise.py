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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from trio.lowlevel import RunVar

from actors.backoff import Backoff, retry
from actors.durable import ended_key, session_key
from actors.faults import maybe_die
from actors.media_correlate import pose_during_stalls, sink_view
from actors.media_tracker import MediaTracker
from actors.pose_stats import PoseStats
from actors.reps import RepEngine
from actors.summary import build_summary
from domain.claims import SessionClaims
from storage.blobs import BlobStore, blob_key
from storage.bus import Bus
from storage.journal import Journal
from storage.replay import ReplayWriter

log = logging.getLogger("telemetry.finalise")

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


@dataclass(frozen=True)
class Finalisation:
    """What finalisation needs of a session that takes nothing more: what it
    holds, and where it goes. Built by the session actor once its mailbox is
    drained (:meth:`actors.session.SessionActor.finalisation`); the objects in it
    (stats, rep engine, replay, media views) are no longer touched by anyone else."""

    claims: SessionClaims
    log_id: str
    end_reason: str | None
    error: str | None
    space: str | None
    started_wall: float
    t0_wall: float | None  # wall time of client t_ms == 0, if any batch came
    stats: PoseStats
    skipped: int
    duplicates: int
    reps: RepEngine | None
    replay: ReplayWriter | None
    media: MediaTracker
    spill_path: Path  # the replay's spill file, removed once the blob is stored
    store: BlobStore
    bus: Bus
    journal: Journal | None  # None: ephemeral, bounded by ``deadline_s``
    backoff: Backoff  # shared with the actor, whose end calls kick it
    deadline_s: float

    @property
    def org_id(self) -> str:
        return self.claims.org_id

    @property
    def session_id(self) -> str:
        return self.claims.session_id

    @property
    def key(self) -> str:
        return session_key(self.claims.org_id, self.claims.session_id)


@dataclass
class _Outcome:
    """What finalisation found wrong on the way (it ends up in the summary)."""

    end_reason: str | None
    error: str | None


def _metrics(job: Finalisation, out: _Outcome) -> dict[str, Any] | None:
    if job.reps is None:
        return None
    try:
        job.reps.finish()
        return job.reps.summary()
    except Exception as exc:
        log.exception("rep engine failed at finish", extra={"session": job.log_id})
        out.error = f"{type(exc).__name__}: {exc}"
        out.end_reason = "actor_error"
        return None


async def _summary(job: Finalisation, attempts: int | None, out: _Outcome) -> dict[str, Any]:
    rep_summary = _metrics(job, out)
    blob: dict[str, Any] | None = None
    replay = job.replay
    if replay is not None and replay.frame_count:
        async with blob_slots():
            data = replay.finish()
            key = blob_key(job.org_id, job.session_id)
            ok, info = await retry(lambda: job.store.put(key, data), "blob put",
                                   job.log_id, attempts, job.backoff)
            # Not held while the session waits for the bus: the blob is stored (or,
            # with attempts exhausted, given up and said so in the summary).
            del data
            replay.release()
        if ok:
            blob = {"key": info.key, "size": info.size, "sha256": info.sha256,
                    "encoding": replay.encoding}
        else:
            out.error = out.error or "blob store unavailable"
    summary = build_summary(
        claims=job.claims, space=job.space, started_wall=job.started_wall,
        ended_wall=time.time(), end_reason=out.end_reason or "client_end", blob=blob,
        stats=job.stats, skipped=job.skipped, duplicates=job.duplicates,
        reps=rep_summary, error=out.error,
    )
    _add_media(job, summary, rep_summary)
    return summary


def _add_media(job: Finalisation, summary: dict[str, Any], reps: dict[str, Any] | None) -> None:
    """Media view summaries, and what the pose stream did while the video stalled."""
    try:
        job.media.finish(job.stats.last_t)
        t0 = job.t0_wall if job.t0_wall is not None else job.started_wall
        summary["media"] = [sink_view(v, t0) for v in job.media.summaries()]
        stalls = job.media.stalls()
        if stalls and job.stats.first_t is not None:
            activity = (float(job.stats.first_t), float(job.stats.last_t or 0))
            summary["media_pose"] = pose_during_stalls(
                stalls, (reps or {}).get("reps", []), activity)
    except Exception as exc:  # a bug here must not cost the pose summary
        log.exception("media summary failed", extra={"session": job.log_id})
        summary["error"] = summary["error"] or f"media: {type(exc).__name__}: {exc}"


async def publish_and_close(bus: Bus, journal: Journal, key: str, summary: dict[str, Any],
                            log_id: str, backoff: Backoff | None = None) -> None:
    """The last two steps, shared with recovery of a session found at ``publish``.

    Every step is retried until it succeeds, so this returns only once the event is
    in the outbox, the summary is kept under :func:`ended_key` and the session's log
    is gone; it raises only ``trio.Cancelled`` (the state file still says
    ``publish``: the next start does this again, idempotently)."""
    await retry(lambda: bus.publish(summary), "publish", log_id, None, backoff)
    maybe_die("after_publish")
    summary["published"] = True
    # Kept for the retention period so late batches and repeated end calls are answered
    # right after a restart too; under its own key, since remove() takes the log and
    # the session's state file together.
    kept = {"summary": summary, "ended_wall": time.time()}
    await retry(lambda: journal.set_state(ended_key(key), kept), "keeping the summary",
                log_id, None, backoff)
    maybe_die("before_remove")
    await retry(lambda: journal.remove(key), "removing the spool log", log_id, None, backoff)


async def record_end(journal: Journal, key: str, end_reason: str | None, log_id: str,
                     backoff: Backoff) -> None:
    """Make a session's end durable (the ``upload`` step's state), retrying until it
    is.

    Until this returns the session is ending only in memory: batches are answered
    503 (retry), not 409, and a crash brings the session back live, as its journal
    says. Raises only ``trio.Cancelled`` (then the end is not recorded)."""
    state = {"step": "upload", "end_reason": end_reason}
    await retry(lambda: journal.set_state(key, state), "recording the end", log_id,
                None, backoff)


async def finalise(job: Finalisation) -> dict[str, Any]:
    """Run (or resume) finalisation after :func:`record_end`; return the summary.

    With a journal it returns only once the blob is stored and the event is in the
    outbox (storage failures are retried, see the module docstring); it raises
    ``trio.Cancelled`` (resumed at the next start) or, for a bug, the exception."""
    try:
        return await _finalise(job)
    finally:
        # The blob is stored (or, on cancellation, will be rebuilt from the journal).
        job.spill_path.unlink(missing_ok=True)


async def _finalise(job: Finalisation) -> dict[str, Any]:
    journal = job.journal
    out = _Outcome(job.end_reason, job.error)
    if journal is None:
        return await _finalise_ephemeral(job, out)
    key = job.key
    maybe_die("upload")
    summary = await _summary(job, None, out)
    maybe_die("after_upload")
    publishing = {"step": "publish", "summary": summary}
    await retry(lambda: journal.set_state(key, publishing), "recording the summary",
                job.log_id, None, job.backoff)
    await publish_and_close(job.bus, journal, key, summary, job.log_id, job.backoff)
    return summary


async def _finalise_ephemeral(job: Finalisation, out: _Outcome) -> dict[str, Any]:
    summary: dict[str, Any] | None = None
    with trio.move_on_after(job.deadline_s) as scope:
        scope.shield = True
        summary = await _summary(job, 4, out)
        ok, _ = await retry(lambda: job.bus.publish(summary), "publish", job.log_id, 4)
        summary["published"] = ok
    if scope.cancelled_caught or summary is None:
        log.error("finalisation timed out", extra={"session": job.log_id})
        summary = build_summary(
            claims=job.claims, space=job.space, started_wall=job.started_wall,
            ended_wall=time.time(), end_reason=out.end_reason or "shutdown", blob=None,
            stats=job.stats, skipped=job.skipped, duplicates=job.duplicates, reps=None,
            error="finalisation timed out",
        )
        summary["published"] = False
    return summary
