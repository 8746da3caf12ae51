"""The end-of-session summary: the event published on the bus and the end call's answer.

Its shape is the contract in ``docs/events.md``; the sink validates it on arrival.
"""

from __future__ import annotations

import time
from typing import Any

from actors.pose_stats import PoseStats
from domain.claims import SessionClaims

EVENT_TYPE = "telemetry.session.ended"
SCHEMA = 1


def iso_time(ts: float) -> str:
    """UTC ISO-8601 with milliseconds, e.g. ``2026-11-22T10:00:00.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def event_id(org_id: str, session_id: str) -> str:
    # Derived, not random: a re-published summary must land on the same rows.
    return f"pose-session:{org_id}:{session_id}"


def build_summary(
    *,
    claims: SessionClaims,
    space: str | None,
    started_wall: float,
    ended_wall: float,
    end_reason: str,
    blob: dict[str, Any] | None,
    stats: PoseStats,
    skipped: int,
    duplicates: int,
    reps: dict[str, Any] | None,
    error: str | None,
) -> dict[str, Any]:
    pose = {"space": space, **stats.to_dict(), "batches_duplicate": duplicates,
            "batches_skipped": skipped}
    return {
        "type": EVENT_TYPE,
        "schema": SCHEMA,
        "event_id": event_id(claims.org_id, claims.session_id),
        "org_id": claims.org_id,
        "session_id": claims.session_id,
        "patient_id": claims.patient_id,
        "exercise": claims.exercise.to_dict(),
        "started_at": iso_time(started_wall),
        "ended_at": iso_time(ended_wall),
        "end_reason": end_reason,
        "error": error,
        "blob": blob,
        "pose": pose,
        "reps": reps,
        "media": [],
    }
