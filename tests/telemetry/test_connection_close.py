"""The known trap: quart-trio on hypercorn's trio worker left `Connection: close`
sockets open. These tests talk raw HTTP/1.1 over a real socket."""

from __future__ import annotations

import trio

from telemetry.config import Settings
from tests.support.service import running_service


async def _read_until_closed(stream: trio.SocketStream, limit_s: float = 3.0) -> tuple[bytes, bool]:
    data = b""
    with trio.move_on_after(limit_s) as scope:
        while chunk := await stream.receive_some():
            data += chunk
    return data, not scope.cancelled_caught


async def test_connection_close_closes_the_socket(settings: Settings) -> None:
    async with running_service(settings) as svc:
        for request in (
            b"GET /v1/healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"GET /v1/readyz HTTP/1.0\r\nHost: t\r\n\r\n",
            b"POST /v1/pose/frames HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Content-Length: 3\r\n\r\nabc",
        ):
            stream = await trio.open_tcp_stream("127.0.0.1", svc.port)
            await stream.send_all(request)
            data, closed = await _read_until_closed(stream)
            await stream.aclose()
            assert data.startswith(b"HTTP/1.1 "), data
            assert closed, f"server left the socket open after: {request.splitlines()[0]!r}"


async def test_keep_alive_still_reuses_the_socket(settings: Settings) -> None:
    async with running_service(settings) as svc:
        stream = await trio.open_tcp_stream("127.0.0.1", svc.port)
        for _ in range(3):
            await stream.send_all(b"GET /v1/healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            while b'"ok"}' not in data:
                data += await stream.receive_some()
            assert data.startswith(b"HTTP/1.1 200")
        await stream.aclose()
