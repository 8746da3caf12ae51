"""Signed tokens: verification of session and service-account JWTs, and dev minting.

The Core API signs a short-lived *session token* when an exercise session starts;
this service verifies it by signature alone (no call back). Operators and the bus
use *service-account tokens* with their own audience and an ``admin`` scope. The
two kinds differ in audience and in the ``typ`` claim, so neither can stand in for
the other.

Verification never trusts the token's header beyond picking a key by ``kid``: the
algorithm allowlist comes from configuration. Every failure raises
:class:`AuthError` with a machine-readable ``reason``; nothing here blocks or does
I/O, so it is safe to call on the event loop.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from telemetry.config import Settings

MAX_TOKEN_BYTES = 4096
SESSION_TYP = "telemetry-session"
SERVICE_TYP = "telemetry-service"
ADMIN_SCOPE = "telemetry:admin"
EXERCISE_KINDS_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class AuthError(Exception):
    """The request's credentials are not acceptable.

    ``status`` is 401 for a missing, malformed, expired or badly signed token or one
    whose scope does not match the resource, 403 for a valid token that lacks the
    permission or consent the endpoint needs.
    """

    def __init__(self, reason: str, detail: str, status: int = 401) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status


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


def is_safe_id(value: object) -> bool:
    """Ids become object-store path segments, so only a conservative charset is allowed."""
    return isinstance(value, str) and bool(_ID_RE.match(value)) and ".." not in value


def bearer_token(headers: Mapping[str, str]) -> str:
    raw = headers.get("Authorization")
    if not raw:
        raise AuthError("missing_token", "Authorization: Bearer <token> header is required")
    scheme, _, token = raw.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed_token", "Authorization header must be 'Bearer <token>'")
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("oversized_token", f"token exceeds {MAX_TOKEN_BYTES} bytes")
    return token


class TokenVerifier:
    """Verifies tokens against the configured keyset. Cheap to construct; immutable."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = dict(settings.jwt_keys)
        self._algorithms = list(settings.jwt_algorithms)

    def _decode(self, token: str, audience: str, required: list[str]) -> dict[str, Any]:
        s = self._settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed_token", "token is not a well-formed JWT") from None
        kid = header.get("kid")
        # An unknown kid is rejected from a dict lookup: no fetch, nothing to amplify.
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError("unknown_kid", "token key id is not recognised")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway_s,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "token is not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong_audience", "token audience is not this service") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong_issuer", "token issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("missing_claim", f"token lacks required claim {exc.claim!r}") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("bad_algorithm", "token algorithm is not allowed") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "token signature does not verify") from None
        except jwt.PyJWTError:
            raise AuthError("invalid_token", "token is invalid") from None
        iat = claims.get("iat")
        exp = claims.get("exp")
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            raise AuthError("invalid_token", "iat and exp must be numeric")
        if exp - iat > s.jwt_max_lifetime_s:
            raise AuthError("lifetime_too_long", "token lifetime exceeds the allowed maximum")
        if iat > time.time() + s.jwt_leeway_s:
            raise AuthError("not_yet_valid", "token was issued in the future")
        return claims

    def verify_session(self, token: str) -> SessionClaims:
        """Verify a session token; raise :class:`AuthError` (401) for any defect."""
        c = self._decode(
            token, self._settings.jwt_audience, ["exp", "iat", "aud", "iss", "sub", "sid", "org_id"]
        )
        if c.get("typ", SESSION_TYP) != SESSION_TYP:
            raise AuthError("wrong_token_type", "not a session token")
        for name in ("sid", "org_id", "sub"):
            if not is_safe_id(c.get(name)):
                raise AuthError("invalid_claim", f"claim {name!r} is not a valid identifier")
        consent = c.get("consent", {})
        if not isinstance(consent, dict):
            raise AuthError("invalid_claim", "claim 'consent' must be an object")
        return SessionClaims(
            org_id=c["org_id"],
            session_id=c["sid"],
            patient_id=c["sub"],
            biometric_consent=consent.get("biometric") is True,
            analytics_consent=consent.get("analytics") is True,
            exercise=_exercise(c.get("ex")),
            expires_at=float(c["exp"]),
        )

    def verify_service(self, token: str, scope: str = ADMIN_SCOPE) -> ServiceClaims:
        """Verify a service-account token: 401 if invalid, 403 if it lacks ``scope``."""
        c = self._decode(token, self._settings.admin_audience, ["exp", "iat", "aud", "iss", "sub"])
        if c.get("typ") != SERVICE_TYP:
            raise AuthError("wrong_token_type", "not a service-account token")
        raw = c.get("scope", "")
        scopes = frozenset(raw.split()) if isinstance(raw, str) else frozenset()
        if scope not in scopes:
            raise AuthError("insufficient_scope", f"token lacks scope {scope!r}", status=403)
        return ServiceClaims(subject=str(c["sub"]), scopes=scopes)


def _exercise(raw: object) -> Exercise:
    if raw is None:
        return Exercise(kind=None)
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise AuthError("invalid_claim", "claim 'ex' must be an object")
    kind = raw.get("kind")
    if kind is not None and not (isinstance(kind, str) and EXERCISE_KINDS_RE.match(kind)):
        raise AuthError("invalid_claim", "claim 'ex.kind' is not a valid exercise kind")
    side = raw.get("side")
    if side not in (None, "left", "right", "both"):
        raise AuthError("invalid_claim", "claim 'ex.side' must be left, right or both")
    target = raw.get("target_reps")
    if target is not None and not (isinstance(target, int) and 0 < target <= 10_000):
        raise AuthError("invalid_claim", "claim 'ex.target_reps' must be a positive integer")
    return Exercise(kind=kind, side=side, target_reps=target)


def mint_session_token(
    settings: Settings,
    *,
    org_id: str,
    session_id: str | None = None,
    patient_id: str = "patient-dev",
    exercise: Mapping[str, Any] | None = None,
    biometric: bool = True,
    analytics: bool = True,
    ttl_s: int = 3600,
    now: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Sign a session token the way the Core API does. For the demo, tests and dev use."""
    now = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "typ": SESSION_TYP,
        "sub": patient_id,
        "org_id": org_id,
        "sid": session_id or uuid.uuid4().hex,
        "iat": int(now),
        "exp": int(now) + ttl_s,
        "consent": {"biometric": biometric, "analytics": analytics},
        "ex": dict(exercise or {"kind": "squat"}),
    }
    claims.update(extra or {})
    return _sign(settings, claims)


def mint_service_token(
    settings: Settings,
    *,
    subject: str = "ops",
    scope: str = ADMIN_SCOPE,
    audience: str | None = None,
    ttl_s: int = 900,
    now: float | None = None,
) -> str:
    """Sign a service-account token (admin endpoints, bus delivery)."""
    now = time.time() if now is None else now
    claims = {
        "iss": settings.jwt_issuer,
        "aud": audience or settings.admin_audience,
        "typ": SERVICE_TYP,
        "sub": subject,
        "scope": scope,
        "iat": int(now),
        "exp": int(now) + ttl_s,
    }
    return _sign(settings, claims)


def _sign(settings: Settings, claims: Mapping[str, Any]) -> str:
    kid = settings.jwt_signing_kid
    return jwt.encode(
        dict(claims),
        settings.jwt_keys[kid],
        algorithm=settings.jwt_algorithms[0],
        headers={"kid": kid},
    )
