"""A minimal WebSocket client for ``bench/loadgen.py``: ``wsproto`` over Trio sockets.

One :class:`WsConn` is one session's WebSocket to ``/v1/pose/stream``, with the
session token in ``Authorization: Bearer`` (a browser offers it as a subprotocol
instead; the load generator uses the header) and no extensions (so no
permessage-deflate). It is driven by one task, the session's: :meth:`WsConn.send`
sends one batch as one binary message, :meth:`WsConn.receive` reads what the
server sent so far and returns it as events::

    ("text", str)              an ack (a whole text message)
    ("close", (code, reason))  the server's close frame (answered here)
    ("eof", why)               the connection broke without one
    ("error", why)             something unexpected (not fatal)

Pings are answered as they are read. A refused handshake raises
:class:`WsRefused` with the HTTP status and body.

``wsproto`` makes the handshake and parses what the server sends. A binary message
is framed here instead (:func:`binary_frame`: the header, and the payload masked
with numpy in one pass), because wsproto's pure-Python masking would cost the load
generator more per batch than the whole HTTP client does.
"""

from __future__ import annotations

import contextlib
import random
import struct
from typing import Any

import numpy as np
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

HOST = "127.0.0.1"
WS_PATH = "/v1/pose/stream"
MAX_HANDSHAKE_BYTES = 1 << 20
# What a broken connection can raise, here or in the session's loop.
TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.TooSlowError, ProtocolError, EOFError)

Event = tuple[str, Any]
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
_FIN_BINARY = 0x82
_MASKED = 0x80


def binary_frame(payload: bytes | bytearray, key: int | None = None) -> bytes:
    """One final, masked binary frame (RFC 6455 5.2) carrying ``payload``; ``key``
    is the 32-bit masking key (random if None)."""
    n = len(payload)
    if key is None:
        key = random.getrandbits(32)
    mask = key.to_bytes(4, "big")  # the key's bytes, in the order they go on the wire
    if n < 126:
        head = bytes((_FIN_BINARY, _MASKED | n))
    elif n < 1 << 16:
        head = _LEN16.pack(_FIN_BINARY, _MASKED | 126, n)
    else:
        head = _LEN64.pack(_FIN_BINARY, _MASKED | 127, n)
    pad = -n % 4
    body = np.frombuffer(bytes(payload) + b"\0" * pad if pad else payload, dtype="<u4")
    masked = (body ^ np.frombuffer(mask, dtype="<u4")[0]).tobytes()
    return head + mask + (masked[:n] if pad else masked)


class WsRefused(Exception):
    """The server answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"handshake refused: {status}")
        self.status = status
        self.body = body


class WsConn:
    """One WebSocket, reconnectable; one task uses it at a time."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.auth = f"Bearer {token}".encode()
        self.stream: trio.SocketStream | None = None
        self.ws: WSConnection | None = None
        self._text: list[str] = []
        self._binary = False

    @property
    def is_open(self) -> bool:
        return self.stream is not None

    async def connect(self) -> None:
        """Open and upgrade; raises :class:`WsRefused` or a transport error."""
        await self.abort()
        stream = await trio.open_tcp_stream(HOST, self.port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(Request(
                host=f"{HOST}:{self.port}", target=WS_PATH,
                extra_headers=[(b"authorization", self.auth)])))
            status, body, seen = 0, bytearray(), 0
            accepted = False
            while not accepted:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise EOFError("connection closed during the handshake")
                seen += len(chunk)
                if seen > MAX_HANDSHAKE_BYTES:
                    raise EOFError("handshake answer too long")
                ws.receive_data(chunk)
                for ev in ws.events():
                    if isinstance(ev, AcceptConnection):
                        accepted = True
                        break  # anything after it is read by receive()
                    if isinstance(ev, RejectConnection):
                        status = ev.status_code
                        if not ev.has_body:
                            raise WsRefused(status, b"")
                    elif isinstance(ev, RejectData):
                        body += ev.data
                        if ev.body_finished:
                            raise WsRefused(status, bytes(body))
        except BaseException:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()
            raise
        self.stream, self.ws = stream, ws
        self._text, self._binary = [], False

    async def send(self, payload: bytes | bytearray) -> None:
        if self.stream is None:
            raise trio.ClosedResourceError("not connected")
        await self.stream.send_all(binary_frame(payload))

    async def receive(self) -> list[Event]:
        """What the server sent, as events (waits for at least one chunk). Transport
        errors come back as an ``eof`` event, not raised."""
        if self.stream is None or self.ws is None:
            return [("eof", "not connected")]
        stream, ws = self.stream, self.ws
        out: list[Event] = []
        try:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return [("eof", "connection closed without a close frame")]
            ws.receive_data(chunk)
            for ev in ws.events():
                if isinstance(ev, TextMessage):
                    if ev.message_finished and not self._text:
                        out.append(("text", ev.data))
                    else:
                        self._text.append(ev.data)
                        if ev.message_finished:
                            out.append(("text", "".join(self._text)))
                            self._text = []
                elif isinstance(ev, BytesMessage):
                    if not self._binary:
                        out.append(("error", "binary message from server"))
                    self._binary = not ev.message_finished
                elif isinstance(ev, Ping):
                    await stream.send_all(ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        with contextlib.suppress(*TRANSPORT_ERRORS):
                            await stream.send_all(ws.send(ev.response()))
                    out.append(("close", (ev.code, ev.reason or "")))
                    break
        except TRANSPORT_ERRORS as exc:
            out.append(("eof", type(exc).__name__))
        return out

    async def close(self, code: int = 1000, wait_s: float = 2.0) -> None:
        """A normal close: send the close frame, read (bounded) until the server's,
        and close the socket. Never raises a transport error."""
        if self.stream is None or self.ws is None:
            return
        stream, ws = self.stream, self.ws
        with trio.move_on_after(wait_s), contextlib.suppress(*TRANSPORT_ERRORS):
            if ws.state is ConnectionState.OPEN:
                await stream.send_all(ws.send(CloseConnection(code=code)))
            for _ in range(1000):  # bounded: acks still in flight, then the close
                events = await self.receive()
                if any(kind in ("close", "eof") for kind, _ in events):
                    break
        await self.abort()

    async def abort(self) -> None:
        """Drop the connection without a close handshake."""
        if self.stream is not None:
            stream, self.stream, self.ws = self.stream, None, None
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()


def int_after(text: str, key: str) -> int | None:
    """The integer after ``key`` and a colon in a small JSON text, without parsing it
    (``int_after('{"seq":5,"status":202}', '"status"') == 202``); None if absent or
    not an integer (``null``)."""
    i = text.find(key)
    if i < 0:
        return None
    j, n = i + len(key), len(text)
    while j < n and text[j] in " :":
        j += 1
    k = j
    while k < n and text[k].isdigit():
        k += 1
    return int(text[j:k]) if k > j else None
