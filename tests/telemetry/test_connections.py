"""Connection guards (telemetry/connections.py): what one client may not do to the
server, over real sockets; the send deadlines also on in-memory streams."""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing

from domain.pose_batch import CONTENT_TYPE
from telemetry.config import Settings
from telemetry.connections import ConnectionGuard, _DeadlineStream
from telemetry.server import GRACEFUL_TIMEOUT_S
from tests.support.payloads import batch_body, session_token
from tests.support.service import Running, running_service
from tests.support.wsclient import CLOSE_FRAME, WsClient, WsClosed, refused_handshake_then


def metric(svc: Running, name: str, **labels: str) -> float:
    assert svc.state is not None
    return svc.state.metrics.registry.get_sample_value(name, labels) or 0.0


async def post_batch(svc: Running, seq: int) -> int:
    r = await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers={
        "Authorization": f"Bearer {session_token(svc.settings)}",
        "Content-Type": "application/x-restartix-pose"})
    return r.status_code


async def test_bytes_after_a_refused_handshake_get_one_answer_and_the_server_goes_on(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # Red-team finding 1: hypercorn answered a second time, h11 raised, and the
    # exception ended the whole server (the process exited).
    rng = random.Random(18)
    async with running_service(settings) as svc:
        assert await post_batch(svc, 0) == 202
        sequences = [(CLOSE_FRAME, True), (CLOSE_FRAME, False),
                     (b"junk\r\n\r\n", True), (b"junk\r\n\r\n", False)]
        sequences += [(rng.randbytes(rng.randint(1, 300)), rng.random() < 0.5)
                      for _ in range(30)]
        for after, read_first in sequences:
            answer = await refused_handshake_then(svc.port, after, read_first=read_first)
            # The app's 401, or hypercorn's 400 when the bytes came first: one answer.
            assert answer == b"" or answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 400"))
            assert answer.count(b"HTTP/1.1 ") <= 1, answer
        # The server, and the session it held, go on.
        assert (await svc.client.get("/v1/healthz")).status_code == 200
        assert await post_batch(svc, 1) == 202
        assert svc.supervisor.live()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_an_exception_in_one_connection_ends_only_that_connection(
        settings: Settings, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Failure injection: whatever else hypercorn's protocol code may raise.
    from hypercorn.protocol.h11 import H11Protocol

    handle = H11Protocol.handle

    async def failing(self: H11Protocol, event: object) -> None:
        if b"X-Inject: boom" in getattr(event, "data", b""):
            raise RuntimeError("injected: org-a/sess-1 must not reach the log")
        await handle(self, event)

    monkeypatch.setattr(H11Protocol, "handle", failing)
    async with running_service(settings) as svc:
        assert await post_batch(svc, 0) == 202
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", svc.port)
            await stream.send_all(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nX-Inject: boom\r\n\r\n")
            with trio.fail_after(5):
                assert await stream.receive_some(65536) == b""  # closed, no answer
            await stream.aclose()
        assert (await svc.client.get("/v1/healthz")).status_code == 200
        assert await post_batch(svc, 1) == 202
        assert metric(svc, "telemetry_connection_errors_total", error="RuntimeError") == 3
    lines = [r for r in caplog.records if r.getMessage().startswith("connection failed")]
    assert len(lines) == 3
    assert all(r.levelno == logging.ERROR and r.exc_info is None
               and getattr(r, "error", None) == "RuntimeError" for r in lines)
    assert not any("sess-1" in r.getMessage() or "org-a" in r.getMessage()
                   for r in caplog.records)


async def _unread_socket(port: int) -> trio.SocketStream:
    """A connection with a tiny receive window, so unread answers back up fast."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def _until_broken(send: Callable[[], Awaitable[None]], *, repeat: bool) -> None:
    """Run ``send`` (once, or until the server breaks the connection)."""
    try:
        while True:
            await send()
            if not repeat:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@pytest.mark.parametrize("kind", ["pipelined_requests", "ping_flood"])
async def test_clients_that_never_read_do_not_hold_shutdown(settings: Settings,
                                                            kind: str) -> None:
    # Red-team finding 5: the server stayed "draining" past 90 s and needed SIGKILL.
    # Without the guard this hung for good; fail instead.
    with trio.fail_after(GRACEFUL_TIMEOUT_S + 30):
        async with trio.open_nursery() as clients:
            async with running_service(settings) as svc:
                if kind == "pipelined_requests":
                    stream = await _unread_socket(svc.port)
                    flood = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000
                    clients.start_soon(partial(_until_broken, partial(stream.send_all, flood),
                                               repeat=False))
                    close: Callable[[], Awaitable[None]] = stream.aclose
                else:
                    token = session_token(settings)
                    ws = await WsClient.connect(svc.port,
                                                headers=[("Authorization", f"Bearer {token}")])
                    clients.start_soon(partial(_until_broken,
                                               partial(ws.send_pings_unread, 10_000, b"p" * 125),
                                               repeat=True))
                    close = ws.aclose
                await trio.sleep(2)  # long enough for the server's sends to block
                stopping = trio.current_time()
            took = trio.current_time() - stopping
            clients.cancel_scope.cancel()
        await close()
    # The hang this guards against lasted past 90 s; teardown of storage is in it too.
    assert took < GRACEFUL_TIMEOUT_S + 10, f"shutdown took {took:.1f} s"
    assert metric(svc, "telemetry_connections_dropped_total", reason="shutdown") == 1


@pytest.mark.parametrize(("length", "code"), [
    (2**63 - 1, 1009),   # within the wire format, far over the message cap
    ("cap+1", 1009),
    (2**63, 1002),       # MSB set: a malformed frame (RFC 6455 5.2), a protocol error
])
async def test_a_frame_over_the_cap_is_refused_from_its_header(
        settings: Settings, length: int | str, code: int) -> None:
    # Red-team finding 7: a header claiming 2**63 bytes got no answer for 10 s.
    n = settings.max_body_bytes + 1 if length == "cap+1" else int(length)
    async with running_service(settings) as svc:
        token = session_token(settings)
        ws = await WsClient.connect(svc.port, headers=[("Authorization", f"Bearer {token}")])
        header = b"\x82\xff" + struct.pack("!Q", n) + b"mask"
        with trio.fail_after(2):
            await ws.send_raw(header + b"\x00" * 16)
            with pytest.raises(WsClosed) as closed:
                await ws.recv()
        assert closed.value.code == code
        assert (await svc.client.get("/v1/healthz")).status_code == 200


async def test_a_send_that_makes_no_progress_breaks_the_connection(
        autojump_clock: trio.testing.MockClock) -> None:
    dropped: list[str] = []
    guard = ConnectionGuard(send_timeout_s=20, frame_cap=1024, on_drop=dropped.append)
    sender, receiver = trio.testing.lockstep_stream_pair()
    start = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):
        await guard.send_all(sender, b"x" * 10)
    assert trio.current_time() - start == pytest.approx(20)
    assert dropped == ["send_timeout"]


async def test_a_slow_reader_that_keeps_up_is_not_cut_off(
        autojump_clock: trio.testing.MockClock) -> None:
    # The deadline is per 64 KiB of progress, not for the whole body.
    guard = ConnectionGuard(send_timeout_s=20, frame_cap=1024)
    sender, receiver = trio.testing.lockstep_stream_pair()
    body = b"x" * (5 * 64 * 1024)
    got = bytearray()

    async def slow_reader() -> None:
        while len(got) < len(body):
            await trio.sleep(15)
            got.extend(await receiver.receive_some(64 * 1024))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_reader)
        await guard.send_all(sender, body)
    assert bytes(got) == body


async def test_shutdown_bounds_sends_already_in_flight(
        autojump_clock: trio.testing.MockClock) -> None:
    dropped: list[str] = []
    guard = ConnectionGuard(send_timeout_s=1000, frame_cap=1024, on_drop=dropped.append)
    sender, receiver = trio.testing.lockstep_stream_pair()
    failed_at: list[float] = []

    async def send() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await guard.send_all(sender, b"x")
        failed_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.sleep(3)
        guard.begin_shutdown(5)
    assert failed_at == [pytest.approx(8)]
    assert dropped == ["shutdown"]


async def _over_cap_chunked(port: int, head: bytes, body: bytes, then: bytes) -> bytes:
    """``head`` and ``body`` (chunked, over the cap), then ``then`` (b"": half-close);
    what came back until the server closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    try:
        await stream.send_all(head + body + then)
        if not then:
            await stream.send_eof()
        with trio.fail_after(5):  # the server closes: it does not wait for us
            while chunk := await stream.receive_some(65536):
                received += chunk
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()
    return received


async def test_closing_on_a_protocol_error_mid_answer_logs_no_error(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # Red-team finding 7: after a 413 on an over-cap chunked body, hypercorn logged a
    # BusyResourceError traceback ("Error in ASGI Framework"). Its reading task met a
    # protocol error (the client half-closed mid-body, or pipelined a request after
    # an answer that closes) and sent EOF while the app task was sending the 413.
    # A race: about one attempt in two failed before the fix.
    settings = dataclasses.replace(settings, max_body_bytes=20_000)
    head = (f"POST /v1/pose/frames HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {session_token(settings)}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    body = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    body *= settings.max_body_bytes // 4096 + 2
    pipelined = b"0\r\n\r\nGET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    async with running_service(settings) as svc:
        for then in [b"", pipelined] * 40:
            answer = await _over_cap_chunked(svc.port, head, body, then)
            # The 413, or nothing when hypercorn closed first: never another answer.
            assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:40]
        assert (await svc.client.get("/v1/healthz")).status_code == 200
        assert metric(svc, "telemetry_connection_errors_total",
                      error="BusyResourceError") == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_send_eof_and_send_all_at_once_do_not_collide() -> None:
    # The mechanism of finding 7 on a real socket: trio's send_eof holds the send
    # conflict detector across a checkpoint; hypercorn calls it outside its lock.
    guard = ConnectionGuard(send_timeout_s=5, frame_cap=1024)
    outcomes: set[str] = set()
    for _ in range(50):
        a, b = trio.socket.socketpair()
        stream = _DeadlineStream(trio.SocketStream(a), guard)
        peer = trio.SocketStream(b)

        async def send(stream: _DeadlineStream = stream) -> None:
            try:
                await stream.send_all(b"answer")
                outcomes.add("sent")
            except trio.ClosedResourceError:
                outcomes.add("closed")  # hypercorn: the connection is gone

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_eof)
            nursery.start_soon(send)
        received = b""
        while chunk := await peer.receive_some(65536):
            received += chunk
        assert received in (b"", b"answer")  # whole, then EOF: never cut
        await stream.aclose()
        await peer.aclose()
    assert outcomes == {"sent", "closed"}  # both orders were exercised
