"""Per-connection guards around hypercorn's trio server: what one client may not do.

hypercorn (0.18) is the HTTP and WebSocket server; three things it leaves to the
application are done here, for every connection of one server, whatever the route:

* **Containment.** hypercorn's per-connection task catches only ``OSError``. Any
  other exception out of its protocol code ends the whole server nursery, and the
  process with it (red-team finding 1; hypercorn issue #225).
  :class:`GuardedTCPServer` ends just that connection, logs one line (exception
  type only: no ids, no client data) and counts it. The case the red team found
  is also removed at its source (:func:`_one_answer_per_handshake`): bytes that
  arrive while the app refuses a WebSocket handshake made hypercorn send a second
  answer (400) over the app's own, which h11 refuses with ``LocalProtocolError``.
* **Send deadlines.** hypercorn sends under a shielded cancel scope, so a client
  that never reads (pipelined requests, a ping flood) holds a connection, and with
  it shutdown, for ever. :class:`_DeadlineStream` gives every send a progress
  deadline (each :data:`SEND_CHUNK` bytes within ``send_timeout_s``), and from
  :meth:`ConnectionGuard.begin_shutdown` on, the server's graceful deadline: a
  connection that does not drain by then is closed.
* **A WebSocket frame cap.** wsproto parses a frame header that declares up to
  2**63 bytes and then waits for them; hypercorn's message cap applies only to bytes
  that arrived. :class:`_FrameCap` refuses such a frame as soon as its header is
  parsed, and :class:`_AnsweringConnection` answers every protocol failure with a
  close frame carrying its code (1009 here) instead of dropping the socket.

:func:`install` patches hypercorn's server class and WebSocket connection class once
per process; the guard in force is the one :meth:`ConnectionGuard.serving` puts in
the serving task's context, so several servers in one process (the tests) keep
their own. Connections served with no guard in their context behave as hypercorn's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.tcp_server import TCPServer
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

log = logging.getLogger("telemetry.connections")

# Progress is judged per chunk: a large body to a slow but reading client is fine,
# a client that takes nothing for send_timeout_s is not.
SEND_CHUNK = 64 * 1024
_PATCHED = "_telemetry_guarded"
_GUARD: ContextVar[ConnectionGuard | None] = ContextVar("telemetry_connection_guard",
                                                       default=None)


@dataclass
class ConnectionGuard:
    """The guards of one server's connections.

    ``on_error(kind)`` is called once per connection ended by an unexpected
    exception, ``on_drop(reason)`` once per connection closed because it did not
    drain (``send_timeout`` or ``shutdown``); both must not raise. ``frame_cap`` is
    the largest WebSocket frame payload taken (the message cap: no frame of a
    message can be larger)."""

    send_timeout_s: float
    frame_cap: int
    on_error: Callable[[str], None] = lambda kind: None
    on_drop: Callable[[str], None] = lambda reason: None
    _shutdown_at: float = math.inf
    _sends: set[trio.CancelScope] = field(default_factory=set)

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Guard the connections hypercorn accepts inside this block (the server is
        started in it, so its connection tasks inherit the context)."""
        install()
        token = _GUARD.set(self)
        try:
            yield
        finally:
            _GUARD.reset(token)

    def begin_shutdown(self, grace_s: float) -> None:
        """From now on every send, in flight or new, ends by ``grace_s`` from now:
        hypercorn's graceful timeout, after which it cancels what is left, except
        the shielded sends this bounds."""
        self._shutdown_at = min(self._shutdown_at, trio.current_time() + grace_s)
        for scope in self._sends:
            scope.deadline = min(scope.deadline, self._shutdown_at)

    async def send_all(self, stream: Any, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on ``stream`` under the deadlines.

        Raises :class:`trio.BrokenResourceError` when a deadline passes (the stream
        is then unusable: hypercorn treats it as a client gone and closes it).
        Runs inside hypercorn's shield, so a cancellation of the connection does
        not interrupt it; only the deadlines do."""
        view = memoryview(data)
        for start in range(0, max(len(view), 1), SEND_CHUNK):
            deadline = min(trio.current_time() + self.send_timeout_s, self._shutdown_at)
            with trio.CancelScope(deadline=deadline) as scope:
                self._sends.add(scope)
                try:
                    await stream.send_all(view[start:start + SEND_CHUNK])
                finally:
                    self._sends.discard(scope)
            if scope.cancelled_caught:
                reason = "shutdown" if self._shutdown_at <= deadline else "send_timeout"
                self.on_drop(reason)
                log.info("connection closed: client did not read", extra={"reason": reason})
                raise _NotReading(f"client did not read ({reason})")


class _NotReading(trio.BrokenResourceError):
    """A send passed its deadline: the client is not reading."""


class _DeadlineStream:
    """A hypercorn connection's stream whose ``send_all`` keeps the guard's
    deadlines and does not collide with ``send_eof``; everything else is the
    stream's own (hypercorn tells TLS from plain TCP by which attributes exist, so
    those pass through unchanged).

    The collision (red-team finding 7): hypercorn serialises its sends with a lock
    but calls ``send_eof`` without it, and trio's ``send_eof`` holds the stream's
    send conflict detector across a checkpoint. When the reading task closes the
    connection on a protocol error while the app task is between h11 and the
    socket with its answer (the client half-closed mid-body, or sent bytes after a
    request answered ``connection: close``), the app's ``send_all`` raised
    ``BusyResourceError``, which hypercorn logs as an app error ("Error in ASGI
    Framework"); the other way round (the reading task's 400 against the app
    task's close), :class:`GuardedTCPServer` logged it. So ``send_eof`` waits for
    a send in flight, and a send after it has begun fails as trio fails a send
    after EOF, with ``ClosedResourceError``: hypercorn takes that as a connection
    gone. ``send_all`` gains no checkpoint: an extra one per send lets the reading
    task fill the app's queue with unread body, and hypercorn then blocks putting
    ``http.disconnect`` into it."""

    def __init__(self, stream: Any, guard: ConnectionGuard) -> None:
        self._stream = stream
        self._guard = guard
        self._closing = False
        # Set while no send is in flight (hypercorn's lock allows one at a time).
        self._idle = trio.Event()
        self._idle.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise trio.ClosedResourceError("the connection is being closed")
        idle = self._idle = trio.Event()
        try:
            await self._guard.send_all(self._stream, data)
        except _NotReading:
            # The send was cut off, maybe mid-message: nothing may follow it, and
            # the reading side must stop too, so the socket is closed at once.
            self._closing = True
            await trio.aclose_forcefully(self._stream)
            raise
        finally:
            idle.set()

    async def send_eof(self) -> None:
        # Looked up first: a TLS stream has none, and hypercorn relies on the
        # AttributeError to tell.
        send_eof = self._stream.send_eof
        self._closing = True
        if not self._idle.is_set():
            await self._idle.wait()
        await send_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class GuardedTCPServer(TCPServer):
    """hypercorn's connection handler, with the guard of its serving context."""

    def __init__(self, app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
        guard = _GUARD.get()
        if guard is not None:
            stream = _DeadlineStream(stream, guard)
        super().__init__(app, config, context, state, stream)
        self._guard = guard

    async def run(self) -> None:
        """Serve the connection; an exception out of it ends this connection only.

        Cancellation and other :class:`BaseException` pass through unchanged."""
        try:
            await super().run()
        except BaseException as exc:  # noqa: BLE001 - split below, never swallowed whole
            errors, rest = _split(exc)
            if errors is not None:
                kind = type(_first_leaf(errors)).__name__
                # Type only: a message may quote client bytes or ids.
                log.error("connection failed; closed it, the server goes on",
                          extra={"error": kind})
                if self._guard is not None:
                    self._guard.on_error(kind)
            if rest is not None:
                raise rest from None


def _split(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(the ``Exception`` part, the rest) of ``exc``, either may be ``None``."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(Exception)
    if isinstance(exc, Exception):
        return exc, None
    return None, exc


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class _FrameCap(Extension):
    """Not a negotiated extension: wsproto's hook on each parsed frame header,
    used to refuse a data frame larger than the message cap before its payload."""

    name = "telemetry-frame-cap"

    def __init__(self, cap: int) -> None:
        self.cap = cap

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(self, proto: FrameDecoder | FrameProtocol, opcode: Opcode,
                             rsv: RsvBits, payload_length: int) -> CloseReason | RsvBits:
        if payload_length > self.cap:
            return CloseReason.MESSAGE_TOO_BIG
        return RsvBits(False, False, False)


class _AnsweringConnection(Connection):
    """wsproto's server connection with the frame cap, answering protocol errors.

    When parsing fails, wsproto yields a ``CloseConnection`` with the failure's code
    but leaves the state ``OPEN``, and hypercorn then drops the socket without a
    close frame: the client sees 1006 and cannot tell why. Marking the close as
    received makes hypercorn answer it with that code (RFC 6455 §7.1.7)."""

    def __init__(self, connection_type: Any, extensions: list[Extension] | None = None,
                 trailing_data: bytes = b"") -> None:
        guard = _GUARD.get()
        if guard is not None:
            extensions = [*(extensions or []), _FrameCap(guard.frame_cap)]
        super().__init__(connection_type, extensions, trailing_data)

    def events(self) -> Any:
        for event in super().events():
            if isinstance(event, CloseConnection) and self.state is ConnectionState.OPEN:
                self._state = ConnectionState.REMOTE_CLOSING
            yield event


def _one_answer_per_handshake(handle: Any) -> Any:
    """Wrap ``WSStream.handle`` so that bytes before a WebSocket handshake is
    accepted get hypercorn's 400 only if no answer is under way, and none after.

    hypercorn answers such bytes with 400 unconditionally: after the app's own
    refusal has started (h11 then raises ``LocalProtocolError``, a second
    response), and before marking the stream closed, so the app's refusal can
    follow its 400 the same way."""
    from hypercorn.protocol.events import Body, Data
    from hypercorn.protocol.ws_stream import ASGIWebsocketState

    async def guarded(self: Any, event: Any) -> None:
        if isinstance(event, Body | Data) and not self.handshake.accepted:
            answering = (self.closed or self.state is not ASGIWebsocketState.HANDSHAKE
                         or getattr(self, "response", None) is not None)
            if not answering:
                self.closed = True  # before the await: the app answers no more
                await self._send_error_response(400)
            return
        await handle(self, event)

    return guarded


def install() -> None:
    """Patch hypercorn to use the guarded classes. Idempotent; a guard's deadlines
    and frame cap apply only to connections served inside
    :meth:`ConnectionGuard.serving`."""
    from hypercorn.protocol import ws_stream

    if getattr(hypercorn_run, _PATCHED, False):
        return
    # worker_serve looks TCPServer up in its module at each start; the WebSocket
    # stream builds its wsproto Connection by the name in its module.
    hypercorn_run.TCPServer = GuardedTCPServer  # type: ignore[misc]
    ws_stream.Connection = _AnsweringConnection  # type: ignore[misc]
    ws_stream.WSStream.handle = _one_answer_per_handshake(  # type: ignore[method-assign]
        ws_stream.WSStream.handle)
    setattr(hypercorn_run, _PATCHED, True)
