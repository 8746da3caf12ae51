"""Minting tokens: for the development tools, the tests and the bus's own token.

Signs with an HMAC key of the keyset (this service never holds private keys), the way
the Core API signs session tokens. Every function reads the keyset (and so the keys
file, when one is configured) and raises :class:`KeyStoreError` if it is bad or holds
no HMAC key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt

from telemetry.auth.keys import KeyStoreError, load_keyset
from telemetry.auth.verify import ADMIN_SCOPE, SERVICE_TYP, SESSION_TYP
from telemetry.config import Settings


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
    """Sign a session token the way the Core API does. For the demo, tests and dev use.

    Signs with the HMAC signing key (see :func:`signing_key`); raises
    :class:`KeyStoreError` if there is none."""
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


def signing_key(settings: Settings) -> tuple[str, bytes, str]:
    """``(kid, secret, algorithm)`` the minting tool signs with.

    The kid is ``settings.jwt_signing_kid`` if the keyset has it as an HMAC key,
    else the keyset's first HMAC kid (with a keys file: the file's first HMAC entry).
    The algorithm is the first allowed one the key is long enough for. Reads the
    keys file when one is configured; raises :class:`KeyStoreError` if the keyset
    is bad or holds no HMAC key (this service never holds private keys)."""
    keys = load_keyset(settings)
    hmac_keys = [vk for vk in keys.values() if vk.family == "HMAC"]
    if not hmac_keys:
        raise KeyStoreError("no HMAC key to sign with (public keys only verify)")
    chosen = keys.get(settings.jwt_signing_kid)
    if chosen is None or chosen.family != "HMAC":
        chosen = hmac_keys[0]
    return chosen.kid, chosen.key, chosen.algorithms[0]


def _sign(settings: Settings, claims: Mapping[str, Any]) -> str:
    kid, secret, alg = signing_key(settings)
    return jwt.encode(dict(claims), secret, algorithm=alg, headers={"kid": kid})
