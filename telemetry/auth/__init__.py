"""Signed tokens: the keyset, verification of session and service-account JWTs, dev minting.

* :mod:`telemetry.auth.keys`: the keyset by kid (:class:`KeyStore`), loaded from the
  settings and the keys file, reloaded on SIGHUP or when the file changes.
* :mod:`telemetry.auth.verify`: :class:`TokenVerifier`, :func:`bearer_token`,
  :func:`check_audience` and :class:`AuthError`; never does I/O.
* :mod:`telemetry.auth.mint`: signing tokens for the demo, the tests and the bus.

Every public name is importable from ``telemetry.auth`` itself.
"""

from domain.claims import Exercise, ServiceClaims, SessionClaims, is_safe_id
from telemetry.auth.keys import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    KEYS_FILE_POLL_S,
    KeyStore,
    KeyStoreError,
    VerificationKey,
    load_keyset,
)
from telemetry.auth.mint import mint_service_token, mint_session_token, signing_key
from telemetry.auth.verify import (
    ADMIN_SCOPE,
    MAX_AUTHORIZATION_BYTES,
    MAX_TOKEN_BYTES,
    SERVICE_TYP,
    SESSION_CACHE_SIZE,
    SESSION_TYP,
    AuthError,
    TokenVerifier,
    bearer_token,
    check_audience,
)

__all__ = [
    "ADMIN_SCOPE",
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "KEYS_FILE_POLL_S",
    "MAX_AUTHORIZATION_BYTES",
    "MAX_TOKEN_BYTES",
    "SERVICE_TYP",
    "SESSION_CACHE_SIZE",
    "SESSION_TYP",
    "AuthError",
    "Exercise",
    "KeyStore",
    "KeyStoreError",
    "ServiceClaims",
    "SessionClaims",
    "TokenVerifier",
    "VerificationKey",
    "bearer_token",
    "check_audience",
    "is_safe_id",
    "load_keyset",
    "mint_service_token",
    "mint_session_token",
    "signing_key",
]
