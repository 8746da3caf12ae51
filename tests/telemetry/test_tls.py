"""TLS terminated by the service itself: real handshakes over loopback.

The app is the real one (``create_app`` with a live supervisor), wrapped as
``server.py`` wraps it plus :func:`telemetry.tls.hsts`, served by hypercorn with the
configuration from :func:`telemetry.tls.apply_tls`. The certificate is self-signed,
made here with ``cryptography``; clients trust exactly that certificate.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import ssl
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from actors.supervisor import Supervisor
from domain.pose_batch import CONTENT_TYPE
from domain.privacy import Pseudonymiser
from storage.blobs import FilesystemBlobStore
from storage.bus import InProcessBus
from telemetry.app import AppState, create_app
from telemetry.auth import TokenVerifier
from telemetry.config import Settings
from telemetry.connection_close import close_on_connection_close
from telemetry.server import hypercorn_config
from telemetry.tls import HSTS_VALUE, TLSConfigError, apply_tls, hsts
from telemetry.wiring import actor_limits
from tests.support.payloads import batch_body, session_token


def make_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_settings(settings: Settings, tmp_path: Path) -> Settings:
    cert, key = make_cert(tmp_path)
    return dataclasses.replace(settings, tls_cert=cert, tls_key=key)


@asynccontextmanager
async def tls_service(settings: Settings) -> AsyncIterator[int]:
    """The real app over TLS on a loopback port; yields the port."""
    store = FilesystemBlobStore(Path(settings.data_dir) / "blobs")
    bus = InProcessBus()
    pseudonyms = Pseudonymiser(settings.pseudonym_key)
    supervisor = Supervisor(actor_limits(settings), store=store, bus=bus, pseudonyms=pseudonyms)
    state = AppState(settings, supervisor, TokenVerifier(settings), pseudonyms)
    config = hypercorn_config(settings)
    assert apply_tls(config, settings) is True
    app = hsts(close_on_connection_close(create_app(state)))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        binds = await nursery.start(partial(hypercorn_serve, app, config,
                                            shutdown_trigger=stop.wait))
        assert binds[0].startswith("https://")
        try:
            yield int(binds[0].rsplit(":", 1)[1])
        finally:
            stop.set()
            await supervisor.drain(5)
            await store.aclose()
            await bus.aclose()


def client_context(cert: Path, *, version: ssl.TLSVersion | None = None,
                   ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    if version is not None:
        with warnings.catch_warnings():
            # Python deprecates TLS 1.0/1.1 clients; this one plays an old client.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            # Let this client really offer the old protocol, so a refusal is the
            # server's doing, not the client library's policy.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext) -> str:
    """Complete a TLS handshake; return the negotiated protocol version."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx,
                                                 https_compatible=True)
    try:
        await stream.do_handshake()
        version = stream.version()
        assert isinstance(version, str)
        return version
    finally:
        await stream.aclose()


async def permissive_handshake(settings: Settings, client: ssl.SSLContext) -> str:
    """Handshake against a throwaway server that still allows TLS 1.0/1.1."""
    assert settings.tls_cert is not None and settings.tls_key is not None
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    server_ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            await stream.aclose()
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(
            trio.serve_ssl_over_tcp, handler, 0, server_ctx, host="127.0.0.1"))
        port = listeners[0].transport_listener.socket.getsockname()[1]
        try:
            return await handshake(port, client)
        finally:
            nursery.cancel_scope.cancel()


async def test_https_with_hsts_and_tls12_floor(tls_settings: Settings) -> None:
    assert tls_settings.tls_cert is not None
    cert = tls_settings.tls_cert
    async with tls_service(tls_settings) as port:
        base = f"https://127.0.0.1:{port}"
        async with httpx.AsyncClient(verify=client_context(cert), timeout=10) as client:
            r = await client.get(f"{base}/v1/healthz")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            assert r.headers["strict-transport-security"] == HSTS_VALUE
            # errors carry HSTS too, and the real handlers run behind TLS
            r = await client.post(f"{base}/v1/pose/frames", content=batch_body(0),
                                  headers={"Content-Type": CONTENT_TYPE})
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
            assert r.headers["strict-transport-security"] == HSTS_VALUE
            tok = session_token(tls_settings)
            r = await client.post(f"{base}/v1/pose/frames", content=batch_body(0), headers={
                "Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {tok}"})
            assert r.status_code == 202, r.text
        # a client that does not trust the certificate is refused by its own check
        async with httpx.AsyncClient(timeout=10) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"{base}/v1/healthz")

        assert await handshake(port, client_context(cert, version=ssl.TLSVersion.TLSv1_3)) \
            == "TLSv1.3"
        assert await handshake(port, client_context(cert, version=ssl.TLSVersion.TLSv1_2)) \
            == "TLSv1.2"
        for old in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
            # control: this very client context completes an old handshake with a
            # permissive server, so the refusal below is our server's version floor
            assert await permissive_handshake(tls_settings, client_context(cert, version=old)) \
                == {ssl.TLSVersion.TLSv1_1: "TLSv1.1", ssl.TLSVersion.TLSv1: "TLSv1"}[old]
            with pytest.raises(trio.BrokenResourceError) as info:
                await handshake(port, client_context(cert, version=old))
            assert isinstance(info.value.__cause__, ssl.SSLError)
        # TLS 1.2 with only a CBC/SHA-1 suite on offer: no shared cipher
        weak = client_context(cert, version=ssl.TLSVersion.TLSv1_2,
                              ciphers="ECDHE-ECDSA-AES128-SHA")
        with pytest.raises(trio.BrokenResourceError):
            await handshake(port, weak)


async def test_plain_http_to_the_tls_port_gets_no_answer(tls_settings: Settings) -> None:
    async with tls_service(tls_settings) as port, httpx.AsyncClient(timeout=5) as client:
        with pytest.raises(httpx.HTTPError):
            r = await client.get(f"http://127.0.0.1:{port}/v1/healthz")
            assert r.status_code >= 400  # some servers answer with an error page


def test_no_tls_settings_leave_the_config_alone(settings: Settings) -> None:
    config = hypercorn_config(settings)
    assert apply_tls(config, settings) is False
    assert config.certfile is None and config.keyfile is None and not config.ssl_enabled


def test_bad_certificate_fails_at_start(tls_settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError, match="cannot be loaded"):
        apply_tls(Config(), dataclasses.replace(tls_settings, tls_cert=broken))
    with pytest.raises(TLSConfigError, match="not a readable file"):
        apply_tls(Config(), dataclasses.replace(tls_settings, tls_key=tmp_path / "missing"))


async def test_hsts_wrapper_keeps_existing_header_and_skips_lifespan() -> None:
    sent: list[dict[str, Any]] = []
    seen_scopes: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen_scopes.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"Strict-Transport-Security", b"max-age=1")]})
            await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "lifespan.startup"}

    wrapped = hsts(app)
    await wrapped({"type": "lifespan"}, receive, send)
    await wrapped({"type": "http"}, receive, send)
    assert seen_scopes == ["lifespan", "http"]
    assert sent[0]["headers"] == [(b"Strict-Transport-Security", b"max-age=1")]
