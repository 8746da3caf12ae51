"""Start-up recovery: carry on every session a previous process left in the journal.

:func:`plan_recovery` reads the journal's keys and states and returns a
:class:`RecoveryPlan`, one step per key, in key order; it changes nothing. The
supervisor carries the plan out (:meth:`actors.hosting.ActorHost.run`), with
:func:`session_start` and :func:`restore` to rebuild a session from its records.
For each key (see :mod:`actors.durable` for what is kept):

* an ended session's kept summary goes back into the supervisor's ended registry
  (or is deleted once past its retention);
* a session found at the ``publish`` step has its stored summary published and is
  closed; one found at ``upload`` (its end was recorded) is rebuilt and finalised
  at once, refusing new batches with 409 meanwhile; both retry storage failures
  until they succeed, and end calls get 503 + Retry-After until they have;
* any other session is rebuilt by replaying its records through the live code
  paths and carries on: new batches continue it, the end call finalises it, idle
  timeout ends it.

A log whose first record is not the session's claims cannot be attributed to a
session; it is left on disk, logged and counted (``unrecoverable``), never fatal.
Torn tails are cut by the journal's reader and counted there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.durable import MEDIA, POSE, START, decode_claims
from actors.media_tracker import MediaTrackerError
from domain.claims import SessionClaims
from domain.media_batch import decode_media_batch
from domain.pose_batch import decode_batch
from storage.journal import Journal, Record

if TYPE_CHECKING:
    from actors.session import SessionActor

log = logging.getLogger("telemetry.recovery")

# Records were validated when they were acknowledged; the caps of today's
# configuration must not make yesterday's records unreadable.
_MAX_FRAMES = 65535
_MAX_EVENTS = 1 << 20
_MAX_MEDIA_BYTES = 64 << 20


@dataclass
class RecoveryReport:
    resumed: int = 0
    finalising: int = 0
    ended_kept: int = 0
    unrecoverable: int = 0
    records: int = 0


@dataclass(frozen=True)
class Forget:
    """An ended session's kept summary past its retention (or unreadable): remove it."""

    key: str


@dataclass(frozen=True)
class KeepEnded:
    """An ended session's summary, to answer end calls and late batches for ``ttl_s``."""

    org_id: str
    session_id: str
    summary: dict[str, Any]
    ttl_s: float


@dataclass(frozen=True)
class ResumePublish:
    """A session found at the ``publish`` step: publish its summary and close it."""

    key: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class Resume:
    """A session to rebuild from its records. ``ended``: its end mark is on disk
    (the ``upload`` step), so it is finalised at once with ``end_reason``."""

    key: str
    ended: bool = False
    end_reason: str = "client_end"


Step = Forget | KeepEnded | ResumePublish | Resume


@dataclass
class RecoveryPlan:
    """What to do with each key, in key order; ``unrecoverable`` counts the keys
    left alone (not a session's)."""

    steps: list[Step] = field(default_factory=list)
    unrecoverable: int = 0


async def plan_recovery(journal: Journal, retention_s: float) -> RecoveryPlan:
    """Read the journal's keys and states into a plan; writes nothing. Raises the
    journal's errors; cancellation propagates (nothing was done)."""
    plan = RecoveryPlan()
    for key in await journal.sessions():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "ended":
            kept = await journal.state(key)
            age = time.time() - float((kept or {}).get("ended_wall", 0))
            if kept is None or age >= retention_s:
                plan.steps.append(Forget(key))
            else:
                plan.steps.append(KeepEnded(parts[1], parts[2], kept["summary"],
                                            retention_s - age))
            continue
        if len(parts) != 2:
            log.error("spool holds an unknown key; left alone")
            plan.unrecoverable += 1
            continue
        state = await journal.state(key) or {}
        if state.get("step") == "publish":
            plan.steps.append(ResumePublish(key, state["summary"]))
        elif state.get("step") == "upload":
            plan.steps.append(Resume(key, True, state.get("end_reason") or "client_end"))
        else:
            plan.steps.append(Resume(key))
    return plan


def session_start(records: list[Record]) -> tuple[SessionClaims, float]:
    """The claims and start time in a session's first record; ValueError if the
    log does not start with them (it cannot be attributed to a session)."""
    if records[0].kind != START:
        raise ValueError("log does not start with the session's claims")
    return decode_claims(records[0].payload)


def restore(actor: SessionActor, records: list[Record]) -> None:
    """Re-apply a session's records after its first (see :func:`session_start`)
    through ``actor``'s live code paths. Raises for a record that does not decode
    (the caller abandons the session); a media record the session refused live
    is skipped, as it was then."""
    for rec in records[1:]:
        if rec.kind == POSE:
            actor.restore_pose(decode_batch(rec.payload, max_frames=_MAX_FRAMES))
        elif rec.kind == MEDIA:
            batch = decode_media_batch(rec.payload, max_events=_MAX_EVENTS,
                                       max_bytes=_MAX_MEDIA_BYTES)
            try:
                actor.media.apply(batch)
            except MediaTrackerError:
                pass  # refused live too (a concurrent batch won the view): skip it
