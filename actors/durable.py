"""What a session keeps in the spool, and how a session is rebuilt from it.

A session's spool log holds, in order:

* ``START``: the verified token claims (JSON), written before its first batch is
  acknowledged, so the session can be rebuilt without the token;
* ``POSE``: each acknowledged pose batch, as the exact bytes the client sent;
* ``MEDIA``: each acknowledged media batch (the JSON body).

Its state file holds the finalisation step (``docs/durability.md``):
``{"step": "upload", "end_reason": ...}`` once the session's end is recorded (the
end mark: from then on the session refuses batches with 409, across restarts too;
before it, an ending session answers 503 so that a restart may carry it on),
``{"step": "publish", "summary": {...}}`` once the blob is stored and verified, and
once the event is in the outbox, the log and state are deleted and
``{"summary": {...}, "ended_wall": t}`` is kept under :func:`ended_key` for
``ended_retention_s``, so a late batch or a repeated end call gets the right
answer after a restart too.

Rebuilding replays the records through the same code paths as live ingest, so a
recovered session's metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import json
from typing import Any

from domain.claims import Exercise, SessionClaims

START, POSE, MEDIA = 1, 2, 3


def session_key(org_id: str, session_id: str) -> str:
    return f"{org_id}/{session_id}"


def ended_key(key: str) -> str:
    """Spool key of an ended session's kept summary: three segments, so it can never
    equal a session key (two)."""
    return f"ended/{key}"


def encode_claims(claims: SessionClaims, started_wall: float) -> bytes:
    return json.dumps({
        "started_wall": started_wall,
        "org_id": claims.org_id, "session_id": claims.session_id,
        "patient_id": claims.patient_id, "biometric": claims.biometric_consent,
        "analytics": claims.analytics_consent, "exercise": claims.exercise.to_dict(),
        "expires_at": claims.expires_at,
    }).encode()


def decode_claims(payload: bytes) -> tuple[SessionClaims, float]:
    """The claims and the session's start (wall clock). Raises ``ValueError`` /
    ``KeyError`` for a record that is not a START payload."""
    d: dict[str, Any] = json.loads(payload)
    ex = d.get("exercise") or {}
    return SessionClaims(
        org_id=d["org_id"], session_id=d["session_id"], patient_id=d["patient_id"],
        biometric_consent=bool(d["biometric"]), analytics_consent=bool(d["analytics"]),
        exercise=Exercise(kind=ex.get("kind"), side=ex.get("side"),
                          target_reps=ex.get("target_reps")),
        expires_at=float(d["expires_at"]),
    ), float(d["started_wall"])
