"""Verification of session and service-account JWTs, and the bearer token of a request.

The Core API signs a short-lived *session token* when an exercise session starts;
this service verifies it by signature alone (no call back). Operators and the bus
use *service-account tokens* with their own audience, ``typ`` and scopes. The two
kinds differ in audience and in the ``typ`` claim, so neither can stand in for the
other. ``aud`` may be one string or an array (RFC 7519 4.1.3; Go's golang-jwt writes
even a single audience as an array), but every member must be the expected audience:
a token that also names any other audience is refused (see :func:`check_audience`).

Keys are looked up by the token's ``kid`` in a :class:`~telemetry.auth.keys.KeyStore`,
which fixes the algorithms the token may use. Verification never does I/O: an unknown
``kid`` is a dict miss (no fetch, no lookup storm), and every failure raises
:class:`AuthError` with a machine-readable ``reason``.

A session sends the same token with every batch (once a second), so
:meth:`TokenVerifier.verify_session` remembers the tokens it has accepted (see
:data:`SESSION_CACHE_SIZE`): a repeat costs a dict lookup and a clock check instead of
a signature check. An entry is served only while the full check would still accept
the token at the current time, and a keyset reload empties the cache.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jwt

from domain.claims import (
    EXERCISE_KINDS_RE,
    Exercise,
    ServiceClaims,
    SessionClaims,
    is_safe_id,
)
from domain.errors import AuthError
from telemetry.auth.keys import KeyStore
from telemetry.config import Settings

MAX_TOKEN_BYTES = 4096
# "Bearer " plus a maximal token plus some whitespace slack.
MAX_AUTHORIZATION_BYTES = MAX_TOKEN_BYTES + 64
SESSION_TYP = "telemetry-session"
SERVICE_TYP = "telemetry-service"
ADMIN_SCOPE = "telemetry:admin"
# Verified session tokens remembered per TokenVerifier (least recently used
# evicted). About 1.3 KB each for a typical 500-byte token (the string plus its
# claims), so about 85 MB if ever full. Entries of expired tokens are also dropped
# from the least recently used end, so the cache holds about the tokens used within
# the last jwt_max_lifetime_s; a live session needs one entry.
SESSION_CACHE_SIZE = 65_536


# -- request helpers ---------------------------------------------------------------


def bearer_token(headers: Mapping[str, str]) -> str:
    """The bearer token of ``headers``; :class:`AuthError` (401) if missing, malformed
    or larger than :data:`MAX_TOKEN_BYTES` (checked before anything parses it)."""
    raw = headers.get("Authorization")
    if not raw:
        raise AuthError("missing_token", "Authorization: Bearer <token> header is required")
    if len(raw) > MAX_AUTHORIZATION_BYTES:
        raise AuthError("oversized_token", f"token exceeds {MAX_TOKEN_BYTES} bytes")
    scheme, _, token = raw.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed_token", "Authorization header must be 'Bearer <token>'")
    token = token.strip()
    if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
        raise AuthError("oversized_token", f"token exceeds {MAX_TOKEN_BYTES} bytes")
    return token


# -- verification ------------------------------------------------------------------


class TokenVerifier:
    """Verifies tokens against a :class:`KeyStore`.

    ``TokenVerifier(settings)`` builds its own key store (reading the keys file if
    one is configured; :class:`KeyStoreError` if the keyset is bad);
    ``TokenVerifier(keystore)`` shares one, e.g. the one whose :meth:`KeyStore.watch`
    runs in the server's root nursery. Verification itself never blocks.
    ``cache_size`` bounds the verified-session-token cache (see :meth:`verify_session`;
    0 turns it off).
    """

    def __init__(self, source: Settings | KeyStore, *,
                 cache_size: int = SESSION_CACHE_SIZE) -> None:
        if isinstance(source, KeyStore):
            self.keystore = source
        else:
            self.keystore = KeyStore(source)
        self._settings = self.keystore.settings
        # Verified session tokens: raw token -> (claims, exp, not_before), see
        # verify_session. Holds only entries verified under keyset generation
        # _cache_generation; emptied when the keystore's generation moves on.
        self._cache: OrderedDict[str, tuple[SessionClaims, int, float]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_generation = self.keystore.generation
        # verify_session runs on the event loop, but nothing stops a caller from
        # using one verifier from several threads; the lock keeps the LRU consistent.
        self._cache_lock = threading.Lock()

    def _decode(self, token: str, audience: str, required: list[str]) -> dict[str, Any]:
        s = self._settings
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("oversized_token", f"token exceeds {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed_token", "token is not a well-formed JWT") from None
        # An unknown kid is rejected from a dict lookup: no fetch, nothing to amplify.
        vk = self.keystore.get(header.get("kid"))
        if vk is None:
            raise AuthError("unknown_kid", "token key id is not recognised")
        # The kid fixes the algorithm family; the header may only pick within it.
        if header.get("alg") not in vk.algorithms:
            raise AuthError("bad_algorithm", "token algorithm is not allowed for its key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                vk.key,
                algorithms=list(vk.algorithms),
                audience=audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway_s,
                # Non-strict: PyJWT then accepts an array that contains `audience`;
                # check_audience below refuses one that names anything else too.
                options={"require": required, "strict_aud": False,
                         "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise _refusal(exc) from None
        check_audience(claims.get("aud"), audience)
        iat = claims.get("iat")
        exp = claims.get("exp")
        if (isinstance(iat, bool) or isinstance(exp, bool)
                or not isinstance(iat, int | float) or not isinstance(exp, int | float)):
            raise AuthError("invalid_token", "iat and exp must be numeric")
        if exp - iat > s.jwt_max_lifetime_s:
            raise AuthError("lifetime_too_long", "token lifetime exceeds the allowed maximum")
        if iat > time.time() + s.jwt_leeway_s:
            raise AuthError("not_yet_valid", "token was issued in the future")
        return claims

    def verify_session(self, token: str) -> SessionClaims:
        """Verify a session token; raise :class:`AuthError` (401) for any defect.

        A token this verifier has accepted before is answered from its cache, but only
        while the full check would accept it now: the entry is used while ``exp`` has
        not passed and ``nbf``/``iat`` have, each with the leeway and the integer
        rounding that check uses, at the current wall-clock time. Otherwise the entry is
        dropped and the full check runs, so it names the reason (``expired``...). A
        keyset reload (any change of :attr:`KeyStore.generation`) empties the cache,
        so a removed kid stops working at once. Rejections are never cached.
        """
        cacheable = len(token) <= MAX_TOKEN_BYTES
        generation = self.keystore.generation
        if cacheable:
            with self._cache_lock:
                if self._cache_generation != generation:
                    self._cache.clear()
                    self._cache_generation = generation
                hit = self._cache.get(token)
                if hit is not None:
                    claims, exp, not_before = hit
                    now, leeway = time.time(), self._settings.jwt_leeway_s
                    # The same comparisons PyJWT and _decode make (exp <= now - leeway
                    # is expired; nbf or iat > now + leeway is not yet valid).
                    if exp > now - leeway and not_before <= now + leeway:
                        self._cache.move_to_end(token)
                        return claims
                    del self._cache[token]
        claims, exp, not_before = self._verify_session(token)
        if cacheable:
            with self._cache_lock:
                # Only if no reload began since `generation` was read: the token was
                # then checked against the keyset of that generation.
                if self._cache_generation == generation == self.keystore.generation:
                    self._insert(token, (claims, exp, not_before))
        return claims

    def _insert(self, token: str, entry: tuple[SessionClaims, int, float]) -> None:
        """Cache ``entry`` as the most recently used (the lock held). Evicts the least
        recently used entry beyond the size bound, and up to two from that end whose
        token has expired: a session that ended leaves its token behind, and nothing
        else would remove it before the bound is reached."""
        cache = self._cache
        cache[token] = entry
        cache.move_to_end(token)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        expired_by = time.time() - self._settings.jwt_leeway_s
        for _ in range(2):
            if not cache or next(iter(cache.values()))[1] > expired_by:
                break
            cache.popitem(last=False)

    def _verify_session(self, token: str) -> tuple[SessionClaims, int, float]:
        """The full check: the claims, and the validity window to cache them for:
        ``exp`` as PyJWT compares it, and the latest of ``iat`` and ``nbf`` as PyJWT and
        :meth:`_decode` compare them."""
        c = self._decode(token, self._settings.jwt_audience, ["exp", "iat", "aud", "iss", "sub"])
        # Type first, then the session claims: a service token here is reported as the
        # wrong kind of token (its audience already failed), not as an incomplete one.
        if c.get("typ", SESSION_TYP) != SESSION_TYP:
            raise AuthError("wrong_token_type", "not a session token")
        for name in ("sid", "org_id"):
            if name not in c:
                raise AuthError("missing_claim", f"token lacks required claim {name!r}")
        for name in ("sid", "org_id", "sub"):
            if not is_safe_id(c.get(name)):
                raise AuthError("invalid_claim", f"claim {name!r} is not a valid identifier")
        consent = c.get("consent", {})
        if not isinstance(consent, dict):
            raise AuthError("invalid_claim", "claim 'consent' must be an object")
        claims = SessionClaims(
            org_id=c["org_id"],
            session_id=c["sid"],
            patient_id=c["sub"],
            biometric_consent=consent.get("biometric") is True,
            analytics_consent=consent.get("analytics") is True,
            exercise=_exercise(c.get("ex")),
            expires_at=float(c["exp"]),
        )
        # PyJWT compares int(exp), int(iat), int(nbf); _decode compares iat itself.
        # All three converted when the token was accepted, so they convert here.
        not_before: float = max(c["iat"], int(c["iat"]))
        if "nbf" in c:
            not_before = max(not_before, int(c["nbf"]))
        return claims, int(c["exp"]), not_before

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


# PyJWT's refusals -> (reason, detail); none of these classes derives from another,
# so the order does not matter. Any other PyJWTError is "invalid_token".
_JWT_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token is not yet valid"),
    (jwt.InvalidAudienceError, "wrong_audience", "token audience is not this service"),
    (jwt.InvalidIssuerError, "wrong_issuer", "token issuer is not trusted"),
    (jwt.InvalidAlgorithmError, "bad_algorithm", "token algorithm is not allowed"),
    (jwt.InvalidSignatureError, "bad_signature", "token signature does not verify"),
)


def _refusal(exc: jwt.PyJWTError) -> AuthError:
    """The :class:`AuthError` (401) that PyJWT's ``exc`` stands for."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError("missing_claim", f"token lacks required claim {exc.claim!r}")
    for kind, reason, detail in _JWT_REFUSALS:
        if isinstance(exc, kind):
            return AuthError(reason, detail)
    return AuthError("invalid_token", "token is invalid")


def check_audience(aud: object, expected: str) -> None:
    """Accept ``aud`` if it is ``expected`` or a non-empty array whose members are all
    ``expected`` (duplicates are harmless); raise :class:`AuthError` ``wrong_audience``
    (401) otherwise: another string, an array that also names any other audience
    (e.g. the session and the admin audience together), an array with a non-string
    member, or any other JSON type. An absent, empty string or empty array ``aud`` is
    ``missing_claim``, as PyJWT reports it before this runs.

    Only our own audience may appear: a token for several audiences is accepted by
    each of them, so any of those recipients could replay it here, and one naming
    both our session and admin audiences would hold both kinds of credential in one.
    """
    if aud is None or aud == "" or aud == []:
        raise AuthError("missing_claim", "token lacks required claim 'aud'")
    members = [aud] if isinstance(aud, str) else aud
    if not isinstance(members, list) or any(m != expected for m in members):
        raise AuthError("wrong_audience", "token audience is not this service")


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
    if target is not None and not (
        isinstance(target, int) and not isinstance(target, bool) and 0 < target <= 10_000
    ):
        raise AuthError("invalid_claim", "claim 'ex.target_reps' must be a positive integer")
    return Exercise(kind=kind, side=side, target_reps=target)
