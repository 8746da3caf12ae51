"""Signed tokens: the keyset, verification of session and service-account JWTs, dev minting.

The Core API signs a short-lived *session token* when an exercise session starts;
this service verifies it by signature alone (no call back). Operators and the bus
use *service-account tokens* with their own audience, ``typ`` and scopes. The two
kinds differ in audience and in the ``typ`` claim, so neither can stand in for the
other. ``aud`` may be one string or an array (RFC 7519 4.1.3; Go's golang-jwt writes
even a single audience as an array), but every member must be the expected audience:
a token that also names any other audience is refused (see :func:`check_audience`).

Keys (:class:`KeyStore`) are looked up by the token's ``kid``. Every kid is bound,
when the keyset is loaded, to one key *family* and the algorithms that family allows:

* an HMAC secret -> the ``HS256``/``HS384``/``HS512`` of ``settings.jwt_algorithms``
  that its length supports (RFC 7518 3.2: at least the hash size);
* an EC P-256 public key -> ``ES256`` only;
* an Ed25519 public key -> ``EdDSA`` only.

So the algorithm a token may use is fixed by the key its ``kid`` names, never by
its ``alg`` header; a kid is never both HMAC and public (that keyset is refused).
This service holds public keys only for the asymmetric families; private key
material in a keyset is refused.

Verification never does I/O: an unknown ``kid`` is a dict miss (no fetch, no
lookup storm), and every failure raises :class:`AuthError` with a machine-readable
``reason``. Reloading the keyset (:meth:`KeyStore.reload`, :meth:`KeyStore.watch`)
swaps one immutable mapping, so a verification in flight sees the old or the new
keyset, never a mixture.

A session sends the same token with every batch (once a second), so
:meth:`TokenVerifier.verify_session` remembers the tokens it has accepted (see
:data:`SESSION_CACHE_SIZE`): a repeat costs a dict lookup and a clock check instead of
a signature check. An entry is served only while the full check would still accept
the token at the current time, and a keyset reload empties the cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from domain.claims import (
    EXERCISE_KINDS_RE,
    Exercise,
    ServiceClaims,
    SessionClaims,
    is_safe_id,
)
from telemetry.config import ConfigError, Settings

log = logging.getLogger("telemetry.auth")

MAX_TOKEN_BYTES = 4096
# "Bearer " plus a maximal token plus some whitespace slack.
MAX_AUTHORIZATION_BYTES = MAX_TOKEN_BYTES + 64
SESSION_TYP = "telemetry-session"
SERVICE_TYP = "telemetry-service"
ADMIN_SCOPE = "telemetry:admin"
_KID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

# HMAC algorithm -> minimum secret length in bytes (the hash output size).
HMAC_ALGORITHMS: Mapping[str, int] = MappingProxyType({"HS256": 32, "HS384": 48, "HS512": 64})
ASYMMETRIC_ALGORITHMS = frozenset({"ES256", "EdDSA"})
KEYS_FILE_POLL_S = 2.0
# Verified session tokens remembered per TokenVerifier (least recently used
# evicted). About 1.3 KB each for a typical 500-byte token (the string plus its
# claims), so about 85 MB if ever full. Entries of expired tokens are also dropped
# from the least recently used end, so the cache holds about the tokens used within
# the last jwt_max_lifetime_s; a live session needs one entry.
SESSION_CACHE_SIZE = 65_536


from domain.errors import AuthError  # noqa: E402  (the tree's credential refusal)


class KeyStoreError(ConfigError):
    """A keyset source is malformed or unsafe. The message names the source and the
    kid at fault, never any key material. A :class:`ConfigError`, so entry points
    that report bad configuration report this the same way."""


# -- the keyset --------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    """One kid's key: its family (``HMAC``, ``EC-P256``, ``Ed25519``), the algorithms
    tokens under this kid may use, and the key itself (bytes for HMAC, a
    ``cryptography`` public key object otherwise)."""

    kid: str
    family: str
    algorithms: tuple[str, ...]
    key: Any = field(repr=False)


def _hmac_key(kid: str, secret: str, settings: Settings, source: str) -> VerificationKey:
    raw = secret.encode()
    if "PRIVATE KEY" in secret or "PUBLIC KEY" in secret:
        raise KeyStoreError(f"{source}: kid {kid!r} is PEM text where an HMAC secret belongs")
    algs = tuple(a for a in settings.jwt_algorithms
                 if a in HMAC_ALGORITHMS and len(raw) >= HMAC_ALGORITHMS[a])
    if not algs:
        allowed = [a for a in settings.jwt_algorithms if a in HMAC_ALGORITHMS]
        raise KeyStoreError(
            f"{source}: HMAC kid {kid!r} ({len(raw)} bytes) is too short for every allowed "
            f"HMAC algorithm {allowed} (RFC 7518 3.2: at least the hash size)")
    return VerificationKey(kid, "HMAC", algs, raw)


def _public_key(kid: str, pem: str, settings: Settings, source: str) -> VerificationKey:
    if "PRIVATE KEY" in pem:
        raise KeyStoreError(f"{source}: kid {kid!r} holds a private key; this service takes "
                            "public keys only")
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(f"{source}: kid {kid!r} is not a PEM public key "
                            f"({type(exc).__name__})") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        family, alg = "EC-P256", "ES256"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        family, alg = "Ed25519", "EdDSA"
    else:
        raise KeyStoreError(f"{source}: kid {kid!r} is a {type(key).__name__}; only EC P-256 "
                            "(ES256) and Ed25519 (EdDSA) public keys are supported")
    listed = set(settings.jwt_algorithms) & ASYMMETRIC_ALGORITHMS
    # Configuring a public key opts its kid into that key's one algorithm. If the
    # allowlist names asymmetric algorithms explicitly, it must name this one too.
    if listed and alg not in listed:
        raise KeyStoreError(f"{source}: kid {kid!r} needs {alg}, which the allowlist "
                            f"{list(settings.jwt_algorithms)} excludes")
    return VerificationKey(kid, family, (alg,), key)


def _read_keys_file(path: Path) -> dict[str, str]:
    source = f"keys file {path}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyStoreError(f"{source}: cannot read ({exc.strerror or type(exc).__name__})")\
            from None
    if len(raw) > 1024 * 1024:
        raise KeyStoreError(f"{source}: larger than 1 MiB")
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeyStoreError(f"{source}: not valid JSON") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
    ):
        raise KeyStoreError(f"{source}: must be a JSON object {{kid: secret or PEM public key}}")
    return data


def load_keyset(settings: Settings) -> dict[str, VerificationKey]:
    """Build the keyset from ``settings`` (and the keys file, when configured).

    HMAC secrets come from the keys file when ``settings.jwt_keys_file`` is set (the
    file is then authoritative: ``TELEMETRY_JWT_KEYS``, which defaults to the
    development key, is ignored for verification), else from ``settings.jwt_keys``.
    Public keys are ``settings.jwt_public_keys`` plus any PEM public key in the file.

    Raises :class:`KeyStoreError` (naming source and kid) for an unreadable file, a
    malformed entry, a kid configured twice, a private key, or an empty keyset.
    Blocking: reads the keys file.
    """
    keys: dict[str, VerificationKey] = {}

    def add(vk: VerificationKey, source: str) -> None:
        if not _KID_RE.match(vk.kid):
            raise KeyStoreError(f"{source}: kid {vk.kid[:40]!r} has invalid characters")
        if vk.kid in keys:
            raise KeyStoreError(f"{source}: kid {vk.kid!r} is configured more than once "
                                f"({keys[vk.kid].family} and {vk.family}); a kid has one key")
        keys[vk.kid] = vk

    if settings.jwt_keys_file is not None:
        source = f"keys file {settings.jwt_keys_file}"
        for kid, value in _read_keys_file(settings.jwt_keys_file).items():
            if "PUBLIC KEY" in value or "PRIVATE KEY" in value:
                add(_public_key(kid, value, settings, source), source)
            else:
                add(_hmac_key(kid, value, settings, source), source)
    else:
        for kid, secret in settings.jwt_keys.items():
            add(_hmac_key(kid, secret, settings, "TELEMETRY_JWT_KEYS"), "TELEMETRY_JWT_KEYS")
    for kid, pem in settings.jwt_public_keys.items():
        add(_public_key(kid, pem, settings, "TELEMETRY_JWT_PUBLIC_KEYS"),
            "TELEMETRY_JWT_PUBLIC_KEYS")
    if not keys:
        raise KeyStoreError("the keyset is empty: every token would be rejected")
    return keys


def _file_signature(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class KeyStore:
    """The keyset by kid, reloadable without a restart.

    Construction loads the keyset and raises :class:`KeyStoreError` if it is bad (a
    deployment with a broken keyset must not start). After that, :meth:`reload`
    never raises: a failed reload logs the reason and keeps the previous keyset, so
    a half-written or mistyped keys file cannot lock every client out.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._file_sig = _file_signature(settings.jwt_keys_file)
        self._keys: Mapping[str, VerificationKey] = MappingProxyType(load_keyset(settings))
        self.generation = 0
        self.last_error: str | None = None
        self._lock: trio.Lock | None = None

    def get(self, kid: object) -> VerificationKey | None:
        """The key for ``kid``; None for an unknown kid or a non-string. No I/O."""
        return self._keys.get(kid) if isinstance(kid, str) else None

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def reload(self) -> bool:
        """Re-read the keyset; True if it was replaced, False if it was kept.

        Never raises (except on interpreter-level errors): any failure is logged with
        the kids still in force and recorded in :attr:`last_error`. Blocking (reads the
        keys file); from async code use :meth:`areload`.
        """
        sig = _file_signature(self.settings.jwt_keys_file)
        try:
            new = load_keyset(self.settings)
        except KeyStoreError as exc:
            error = str(exc)
        except Exception as exc:  # a bug in parsing must not take the service down
            error = f"unexpected {type(exc).__name__} while loading the keyset"
        else:
            old = set(self._keys)
            self._keys = MappingProxyType(new)
            self._file_sig = sig
            self.generation += 1
            self.last_error = None
            log.info("jwt keyset reloaded", extra={
                "kids": sorted(new), "added": sorted(set(new) - old),
                "removed": sorted(old - set(new)), "generation": self.generation})
            return True
        # Remember the file state we failed on so a broken file is reported once per
        # change, not on every poll.
        self._file_sig = sig
        self.last_error = error
        log.error("jwt keyset reload failed; keeping the current keys",
                  extra={"error": error, "kids": sorted(self._keys)})
        return False

    async def areload(self) -> bool:
        """:meth:`reload` in a worker thread, serialised with other async reloads.

        Cancellation: the thread finishes its (short) read; the swap, if any, still
        happens, and Cancelled is raised at the next checkpoint."""
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            return await trio.to_thread.run_sync(self.reload)

    def changed_on_disk(self) -> bool:
        """True if the keys file's mtime, size or inode differ from the last load."""
        if self.settings.jwt_keys_file is None:
            return False
        return _file_signature(self.settings.jwt_keys_file) != self._file_sig

    async def watch(
        self,
        *,
        poll_s: float = KEYS_FILE_POLL_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Reload on SIGHUP and whenever the keys file changes; run until cancelled.

        SIGHUP is handled only on the main thread (where Trio can receive signals);
        elsewhere only the file is watched. The file is polled every ``poll_s``
        seconds with :func:`trio.sleep` (so a test's autojump clock drives it). A
        failed reload is logged and keeps the old keys; it never ends the watch.
        Cancellation ends it promptly (a reload in flight completes first).
        """
        sighup = getattr(signal, "SIGHUP", None)
        on_main = threading.current_thread() is threading.main_thread()
        receiver = (trio.open_signal_receiver(sighup) if sighup is not None and on_main
                    else nullcontext(None))
        with receiver as signals:
            async with trio.open_nursery() as nursery:
                if signals is not None:
                    nursery.start_soon(self._on_signals, signals)
                if self.settings.jwt_keys_file is not None:
                    nursery.start_soon(self._poll, poll_s)
                task_status.started()
                await trio.sleep_forever()

    async def _on_signals(self, signals: Any) -> None:
        async for _ in signals:
            log.info("SIGHUP: reloading the jwt keyset")
            await self.areload()

    async def _poll(self, poll_s: float) -> None:
        while True:
            await trio.sleep(poll_s)
            if await trio.to_thread.run_sync(self.changed_on_disk):
                await self.areload()


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


# -- minting (development tool, tests, the bus's own token) ------------------------


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
