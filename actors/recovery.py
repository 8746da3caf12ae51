"""Start-up recovery: carry on every session a previous process left in the spool.

For each key in the spool (see :mod:`actors.durable` for what is kept):

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
Torn tails are cut by the spool's reader and counted there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from actors.durable import MEDIA, POSE, START, decode_claims
from actors.media_correlate import MediaTrackerError
from domain.media_batch import decode_media_batch
from domain.pose_batch import decode_batch
from storage.spool import Spool

if TYPE_CHECKING:
    from actors.session import SessionActor
    from actors.supervisor import Supervisor

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


async def recover(sup: Supervisor, spool: Spool) -> RecoveryReport:
    """Rebuild the spool's sessions into ``sup`` (whose nursery must be open)."""
    report = RecoveryReport()
    retention = sup.settings.ended_retention_s
    for key in await trio.to_thread.run_sync(spool.keys):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "ended":
            kept = spool.get_state(key)
            age = time.time() - float((kept or {}).get("ended_wall", 0))
            if kept is None or age >= retention:
                await spool.remove(key)
            else:
                sup.remember(parts[1], parts[2], kept["summary"], retention - age)
                report.ended_kept += 1
            continue
        if len(parts) != 2:
            log.error("spool holds an unknown key; left alone")
            report.unrecoverable += 1
            continue
        state = spool.get_state(key) or {}
        if state.get("step") == "publish":
            sup.resume_publish(key, state["summary"])
            report.finalising += 1
            continue
        try:
            actor, resumed = await _rebuild(sup, spool, key)
        except Exception:  # one bad log must not keep the service from starting
            log.exception("spool log could not be replayed; left alone")
            report.unrecoverable += 1
            continue
        if actor is None:
            continue
        report.records += resumed
        if state.get("step") == "upload":
            # The end mark is on disk: batches get 409 at once, as before the restart.
            actor.mark_end_recorded()
            actor.request_end(state.get("end_reason") or "client_end")
            report.finalising += 1
        else:
            report.resumed += 1
        sup.launch(actor)
    return report


async def _rebuild(sup: Supervisor, spool: Spool,
                   key: str) -> tuple[SessionActor | None, int]:
    records = await spool.aread(key)
    if not records:
        await spool.remove(key)  # nothing was ever acknowledged
        return None, 0
    if records[0].kind != START:
        raise ValueError("log does not start with the session's claims")
    claims, started_wall = decode_claims(records[0].payload)
    actor = sup.adopt(claims, started_wall)
    try:
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
    except Exception:
        sup.abandon(actor)
        raise
    return actor, len(records)
