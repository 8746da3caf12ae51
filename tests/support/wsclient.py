"""A small WebSocket client for tests: wsproto over a real Trio TCP socket.

Messages come back in order from :meth:`WsClient.recv`; a close from the server
raises :class:`WsClosed` with its code; a refused handshake raises
:class:`WsRefused` with the HTTP status, headers and body.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension


class WsRefused(Exception):
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"handshake refused: {status}")
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class WsClosed(Exception):
    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class WsClient:
    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._events: deque[Event] = deque()
        self._parts: list[Any] = []
        self.subprotocol: str | None = None
        self.extensions: list[Extension] = []
        self.headers: dict[str, str] = {}

    @classmethod
    async def connect(cls, port: int, path: str = "/v1/pose/stream", *,
                      headers: Sequence[tuple[str, str]] = (),
                      subprotocols: Sequence[str] = (),
                      extensions: Sequence[Extension] = ()) -> WsClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        client = cls(stream, ws)
        await client._send(Request(host=f"127.0.0.1:{port}", target=path,
                                   extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                                   subprotocols=list(subprotocols),
                                   extensions=list(extensions)))
        event = await client._next()
        if isinstance(event, AcceptConnection):
            client.subprotocol = event.subprotocol
            client.extensions = list(event.extensions)
            client.headers = {k.decode().lower(): v.decode() for k, v in event.extra_headers}
            return client
        assert isinstance(event, RejectConnection), event
        refused_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        body = b""
        if event.has_body:
            while True:
                part = await client._next()
                assert isinstance(part, RejectData), part
                body += part.data
                if part.body_finished:
                    break
        await stream.aclose()
        raise WsRefused(event.status_code, refused_headers, body)

    async def _send(self, event: Event) -> None:
        await self._stream.send_all(self._ws.send(event))

    async def _next(self) -> Event:
        while not self._events:
            data = await self._stream.receive_some(65536)
            self._ws.receive_data(data or None)
            for event in self._ws.events():
                if isinstance(event, Ping):
                    if self._ws.state is ConnectionState.OPEN:
                        await self._send(event.response())
                else:
                    self._events.append(event)
        return self._events.popleft()

    async def send_bytes(self, data: bytes) -> None:
        await self._send(BytesMessage(data=data))

    async def send_raw(self, data: bytes) -> None:
        """Bytes on the socket as they are, for frames wsproto would not write."""
        await self._stream.send_all(data)

    async def send_pings_unread(self, count: int, payload: bytes = b"") -> None:
        """``count`` pings in one write, reading nothing back (the pongs stay unread)."""
        await self._stream.send_all(b"".join(self._ws.send(Ping(payload=payload))
                                             for _ in range(count)))

    async def aclose(self) -> None:
        """Close the socket without a closing handshake."""
        await self._stream.aclose()

    async def send_text(self, text: str) -> None:
        await self._send(TextMessage(data=text))

    async def recv(self) -> str | bytes:
        """The next whole message; :class:`WsClosed` if the server closed."""
        while True:
            event = await self._next()
            if isinstance(event, CloseConnection):
                try:
                    await self._send(event.response())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await self._stream.aclose()
                raise WsClosed(event.code, event.reason)
            assert isinstance(event, Message), event
            self._parts.append(event.data)
            if event.message_finished:
                parts, self._parts = self._parts, []
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    async def recv_json(self) -> dict[str, Any]:
        message = await self.recv()
        assert isinstance(message, str), message
        return json.loads(message)

    async def close(self, code: int = 1000) -> None:
        await self._send(CloseConnection(code=code))
        with trio.move_on_after(5):
            while True:
                event = await self._next()
                if isinstance(event, CloseConnection):
                    break
        await self._stream.aclose()


# A masked client close frame (code 1000), as a browser sends when it gives up.
CLOSE_FRAME = b"\x88\x82" + b"abcd" + bytes(a ^ b for a, b in zip(b"\x03\xe8", b"ab", strict=True))


async def refused_handshake_then(port: int, after: bytes, *, read_first: bool,
                                 path: str = "/v1/pose/stream") -> bytes:
    """A WebSocket handshake with no token (which the server refuses), then ``after``
    on the same connection, sent before or after reading the first answer bytes;
    what the server sent back until it closed (or 0.3 s passed). Red-team finding 1:
    this sequence made hypercorn answer twice, and the exception ended the server."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    try:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        if read_first:
            received += await stream.receive_some(65536)
        await stream.send_all(after)
        with trio.move_on_after(0.3):
            while chunk := await stream.receive_some(65536):
                received += chunk
    except trio.BrokenResourceError:
        pass  # the server closed first: that is allowed
    finally:
        await stream.aclose()
    return received
