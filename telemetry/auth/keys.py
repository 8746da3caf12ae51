"""The keyset: the verification key of every kid, loaded from settings and the keys file,
reloadable without a restart.

Every kid is bound, when the keyset is loaded, to one key *family* and the algorithms
that family allows:

* an HMAC secret -> the ``HS256``/``HS384``/``HS512`` of ``settings.jwt_algorithms``
  that its length supports (RFC 7518 3.2: at least the hash size);
* an EC P-256 public key -> ``ES256`` only;
* an Ed25519 public key -> ``EdDSA`` only.

So the algorithm a token may use is fixed by the key its ``kid`` names, never by
its ``alg`` header; a kid is never both HMAC and public (that keyset is refused).
This service holds public keys only for the asymmetric families; private key
material in a keyset is refused.

Reloading the keyset (:meth:`KeyStore.reload`, :meth:`KeyStore.watch`) swaps one
immutable mapping, so a verification in flight sees the old or the new keyset, never
a mixture. A bad keyset at construction raises :class:`KeyStoreError`; a bad one at
reload is logged and the previous keyset kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from telemetry.config import ConfigError, Settings

# The package's logger name, unchanged since auth was one module.
log = logging.getLogger("telemetry.auth")

_KID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

# HMAC algorithm -> minimum secret length in bytes (the hash output size).
HMAC_ALGORITHMS: Mapping[str, int] = MappingProxyType({"HS256": 32, "HS384": 48, "HS512": 64})
ASYMMETRIC_ALGORITHMS = frozenset({"ES256", "EdDSA"})
KEYS_FILE_POLL_S = 2.0


class KeyStoreError(ConfigError):
    """A keyset source is malformed or unsafe. The message names the source and the
    kid at fault, never any key material. A :class:`ConfigError`, so entry points
    that report bad configuration report this the same way."""


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
