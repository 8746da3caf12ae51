"""What a verified session token grants, and the id rules every layer relies on.

Pure values: the token verifier (``telemetry.auth``) builds them, the actors and the
journal carry them. Nothing here checks a signature or does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

EXERCISE_KINDS_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# fullmatch: with match and "$", an id ending in a newline passed ("$" matches before it).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# The spool keeps a session's state as "{org}/{session}.state.json" (and read logs of
# the older layout as "{org}/{session}.log"), and keeps
# temp files as ".tmp": an id ending so could collide with those names.
_RESERVED_ID_SUFFIXES = (".log", ".json", ".tmp")


def is_safe_id(value: object) -> bool:
    """Ids become object-store and spool path segments, so only a conservative charset
    is allowed, without the spool's reserved file suffixes."""
    return (isinstance(value, str) and bool(_ID_RE.fullmatch(value)) and ".." not in value
            and not value.endswith(_RESERVED_ID_SUFFIXES))


@dataclass(frozen=True)
class Exercise:
    kind: str | None
    side: str | None = None
    target_reps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "side": self.side, "target_reps": self.target_reps}


@dataclass(frozen=True)
class SessionClaims:
    """What a verified session token grants: one session of one patient in one org."""

    org_id: str
    session_id: str
    patient_id: str
    biometric_consent: bool
    analytics_consent: bool
    exercise: Exercise
    expires_at: float


@dataclass(frozen=True)
class ServiceClaims:
    subject: str
    scopes: frozenset[str]
