"""The load generator's WebSocket transport (``bench/loadgen.py``, ``bench/loadws.py``)
against the yardsticks of ``bench/bare_app.py`` and small ASGI apps that refuse,
restart and end, all in process on hypercorn."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import numpy as np
import pytest
import trio
from hypercorn.trio import serve
from wsproto.frame_protocol import FrameProtocol, Opcode

from bench import bare_app
from bench.loadgen import KIND_BATCH, KIND_CONNECT, Runner, Session, make_pool, make_sessions
from bench.loadws import binary_frame, int_after
from telemetry.config import Settings

KEYS = json.dumps({"bench": "0123456789abcdef" * 4})


@pytest.fixture(scope="module")
def sessions() -> list[Session]:
    pool = make_pool(sessions=1, reps=3)
    settings = Settings.from_env({"TELEMETRY_JWT_KEYS": KEYS})
    return make_sessions(settings, "t", range(2), pool, 1)


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[int]:
    config = bare_app.config(0)
    config.websocket_ping_interval = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        yield int(binds[0].rsplit(":", 1)[1])
        stop.set()


async def stream(port: int, s: Session, batches: int, window: int = 1) -> Runner:
    """``batches`` batches closed-loop over ws, then a close and the HTTP end."""
    runner = Runner(port, trio.current_time(), 5.0, False, "ws", window)
    with trio.fail_after(20):
        await runner.closed(s, 15.0, batches, True, None)
    return runner


def statuses(r: Runner, kind: int = KIND_BATCH) -> list[int]:
    return [st for st, k in zip(r.rec.status, r.rec.kind, strict=True) if k == kind]


@pytest.mark.parametrize("n", [0, 3, 125, 126, 1000, 65535, 65536, 70003])
def test_binary_frame_is_what_a_server_reads(n: int) -> None:
    payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(binary_frame(payload))
    (frame,) = list(server.received_frames())
    assert frame.opcode is Opcode.BINARY and frame.message_finished
    assert bytes(frame.payload) == payload


def test_int_after() -> None:
    assert int_after('{"seq":5,"status":202,"duplicate":false}', '"status"') == 202
    assert int_after('{"seq": 17, "status": 409}', '"seq"') == 17
    assert int_after('{"seq":null,"status":400}', '"seq"') is None
    assert int_after("{}", '"status"') is None


@pytest.mark.parametrize("which", ["quart", "raw"])
@pytest.mark.parametrize("window", [1, 3])
async def test_streams_to_the_bare_apps(sessions: list[Session], which: str,
                                        window: int) -> None:
    app = bare_app.quart_app() if which == "quart" else bare_app.raw_app
    async with serving(app) as port:
        r = await stream(port, sessions[0], 7, window)
    assert statuses(r) == [202] * 7
    assert statuses(r, KIND_CONNECT) == [101]
    assert r.rec.codes == {}
    assert r.rec.end_checks == {"ended": 1}


def ws_app(on_batch: Callable[[int, int], dict[str, Any] | None],
           refuse: dict[str, Any] | None = None) -> Any:
    """An ASGI app: ``on_batch(connection number, seq)`` says how to answer each
    batch (None: the accepted ack; else an ASGI message to send instead)."""
    conns = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal conns
        if scope["type"] != "websocket":
            await bare_app.raw_app(scope, receive, send)
            return
        await receive()
        if refuse is not None:
            body = json.dumps(refuse["body"]).encode()
            await send({"type": "websocket.http.response.start", "status": refuse["status"],
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        conns += 1
        n = conns
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            seq = int.from_bytes(message["bytes"][8:12], "little")
            answer = on_batch(n, seq)
            if answer is None:
                await send({"type": "websocket.send", "text": bare_app.ws_ack(message["bytes"])})
            else:
                await send(answer)
                if answer["type"] == "websocket.close":
                    return

    return app


async def test_a_restart_close_reconnects_and_resends(sessions: list[Session]) -> None:
    def on_batch(conn: int, seq: int) -> dict[str, Any] | None:
        if conn == 1 and seq == 3:  # batch 3 unacknowledged, then 1012
            return {"type": "websocket.close", "code": 1012}
        return None

    async with serving(ws_app(on_batch)) as port:
        r = await stream(port, sessions[1], 6)
    assert statuses(r) == [202] * 6  # nothing lost, no error
    assert statuses(r, KIND_CONNECT) == [101, 101]
    assert r.rec.codes == {"ws close 1012 (reconnected; not an error)": 1}


async def test_a_refusal_is_an_error_by_status_and_code(sessions: list[Session]) -> None:
    def on_batch(conn: int, seq: int) -> dict[str, Any] | None:
        if seq == 1:
            return {"type": "websocket.send", "text": json.dumps({
                "seq": seq, "status": 409, "error": {"code": "session_ended", "message": "x"}})}
        if seq == 2:
            return {"type": "websocket.close", "code": 4409, "reason": "session_ended"}
        return None

    async with serving(ws_app(on_batch)) as port:
        r = await stream(port, sessions[0], 5)
    assert statuses(r) == [202, 409, 0]  # 409 not retried; the batch in flight at 4409
    assert r.rec.codes == {"409 session_ended": 1, "ws close 4409 session_ended": 1,
                           "not sent: ws closed 4409": 1}


async def test_a_refused_handshake_is_counted_and_retried(sessions: list[Session]) -> None:
    refuse = {"status": 503, "body": {"error": {"code": "shutting_down", "message": "x"}}}
    async with serving(ws_app(lambda conn, seq: None, refuse)) as port:
        r = await stream(port, sessions[0], 1)
    assert statuses(r) == [503] * 4  # the first try and RETRIES more
    assert r.rec.codes == {"handshake 503 shutting_down": 4}
