"""TLS termination by the service itself, and HSTS.

The usual deployment terminates TLS at the load balancer (ALB) and forwards plain
HTTP inside the VPC; then neither function here is used. When
``TELEMETRY_TLS_CERT`` and ``TELEMETRY_TLS_KEY`` are set the service terminates TLS
itself: :func:`apply_tls` configures hypercorn for TLS 1.2+ with forward-secret AEAD
ciphers only, and :func:`hsts` wraps the ASGI app so every HTTP response carries
``Strict-Transport-Security``.
"""

from __future__ import annotations

import ssl

from hypercorn.config import Config

from telemetry.asgi import ASGIApp, Message, Receive, Scope, Send
from telemetry.config import Settings

HSTS_VALUE = "max-age=31536000; includeSubDomains"
# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305
# only; no CBC, RSA key exchange, SHA-1 MACs, or anonymous/export suites. TLS 1.3
# suites are fixed by OpenSSL and are all AEAD.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
SSL_HANDSHAKE_TIMEOUT_S = 10.0



class TLSConfigError(ValueError):
    """The certificate or key cannot be loaded; the message names the file."""


def apply_tls(config: Config, settings: Settings) -> bool:
    """Configure ``config`` to terminate TLS with ``settings.tls_cert``/``tls_key``.

    Returns False (and leaves ``config`` untouched) when TLS is not configured.
    Otherwise sets the certificate, key and ciphers, pins the minimum protocol to
    TLS 1.2 whatever hypercorn's default, shortens the handshake timeout (a slow
    handshake holds a socket), builds the context once so a bad certificate or key
    fails start-up with :class:`TLSConfigError`, and returns True; the caller then
    wraps the app with :func:`hsts`.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return False
    for what, path in (("TELEMETRY_TLS_CERT", settings.tls_cert),
                       ("TELEMETRY_TLS_KEY", settings.tls_key)):
        if not path.is_file():
            raise TLSConfigError(f"{what}={str(path)!r} is not a readable file")
    config.certfile = str(settings.tls_cert)
    config.keyfile = str(settings.tls_key)
    config.ciphers = CIPHERS
    config.ssl_handshake_timeout = SSL_HANDSHAKE_TIMEOUT_S
    base = config.create_ssl_context

    def create_ssl_context() -> ssl.SSLContext | None:
        context = base()
        if context is not None:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                                | ssl.OP_NO_RENEGOTIATION)
        return context

    # An instance attribute shadows the method; hypercorn calls config.create_ssl_context().
    config.create_ssl_context = create_ssl_context  # type: ignore[method-assign]
    try:
        create_ssl_context()
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"TELEMETRY_TLS_CERT/TELEMETRY_TLS_KEY cannot be loaded: {exc}") from None
    return True


def hsts(app: ASGIApp, value: str = HSTS_VALUE) -> ASGIApp:
    """Wrap ``app`` so every HTTP response has ``Strict-Transport-Security: value``.

    A header the app already set is kept. Non-HTTP scopes (lifespan) pass through
    untouched. Errors and cancellation from ``app`` propagate unchanged.
    """
    header = (b"strict-transport-security", value.encode("latin-1"))

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message.get("type") == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(name.lower() == header[0] for name, _ in headers):
                    headers.append(header)
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_hsts)

    return wrapped
