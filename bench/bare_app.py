"""The yardsticks for ``bench/load.py``: the bare framework, and raw ASGI, on hypercorn.

``--app quart`` (default): a quart-trio app that reads the same 16 KB pose POST and
answers 202 with a small JSON body, and nothing else: no auth, no decode, no
actor, no spool. ``--app raw``: the same answer from a plain ASGI callable, with
no framework at all (the floor of hypercorn's trio worker). Both also answer
``GET /v1/healthz`` (readiness) and ``POST /v1/sessions/{id}/end`` (200, ``{}``),
so the load generator drives them exactly as it drives the service.

Both also serve the WebSocket transport, ``/v1/pose/stream``: the handshake is
accepted whatever its headers, and each binary message (one batch, as the POST
body) is answered with the service's accepted ack, byte for byte
(``{"seq":N,"status":202,"duplicate":false}``), N read from the batch header (u32 at offset 8,
``domain/pose_batch.py``). A text message from the client is closed with 1003, as
the service does. quart-trio through its ``@app.websocket`` route; raw ASGI
through the ``websocket`` scope directly.

Hypercorn is configured like the service's (``telemetry.server.hypercorn_config``:
keep-alive, backlog, no access log, WebSocket message cap and pings), on 127.0.0.1
only::

    .venv/bin/python -m bench.bare_app --port 8090 [--app raw]
"""

from __future__ import annotations

import argparse
import logging
import signal
import struct
import sys
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

if __package__ in (None, ""):  # allow `python bench/bare_app.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telemetry.config import Settings  # noqa: E402
from telemetry.server import (  # noqa: E402
    BACKLOG,
    GRACEFUL_TIMEOUT_S,
    KEEP_ALIVE_TIMEOUT_S,
    WEBSOCKET_PING_S,
)

ACK = b'{"seq":0,"duplicate":false}'
ENDED = b"{}"
HEALTHY = b'{"status":"ok"}'
_SEQ = struct.Struct("<I")  # the batch sequence number, at offset 8 of the header


def ws_ack(batch: bytes) -> str:
    """The accepted ack for a batch; seq 0 if the message is too short for a header."""
    seq = _SEQ.unpack_from(batch, 8)[0] if len(batch) >= 12 else 0
    return f'{{"seq":{seq},"status":202,"duplicate":false}}'


def quart_app() -> Any:
    from quart import Response, request, websocket
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)

    @app.post("/v1/pose/frames")
    async def pose_frames() -> Response:
        await request.get_data(cache=False)
        return Response(ACK, status=202, mimetype="application/json")

    @app.post("/v1/sessions/<session_id>/end")
    async def end(session_id: str) -> Response:
        return Response(ENDED, status=200, mimetype="application/json")

    @app.get("/v1/healthz")
    @app.get("/v1/readyz")  # the router's check (bench/bench_router.py)
    async def healthz() -> Response:
        return Response(HEALTHY, status=200, mimetype="application/json")

    @app.websocket("/v1/pose/stream")
    async def pose_stream() -> None:
        while True:  # until the client closes (Quart cancels the route then)
            data = await websocket.receive()
            if isinstance(data, str):
                await websocket.close(1003)
                return
            await websocket.send(ws_ack(data))

    return app


async def raw_websocket(receive: Any, send: Any) -> None:
    """The WebSocket route as a plain ASGI callable: accept, ack every batch."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:  # until the client closes
        message = await receive()
        if message["type"] != "websocket.receive":
            return  # websocket.disconnect
        data = message.get("bytes")
        if data is None:
            await send({"type": "websocket.close", "code": 1003})
            return
        await send({"type": "websocket.send", "text": ws_ack(data)})


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A plain ASGI callable: read the whole body, answer, nothing else."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        if scope["path"] == "/v1/pose/stream":
            await raw_websocket(receive, send)
        else:
            await receive()
            await send({"type": "websocket.close", "code": 1008})
        return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return  # disconnected
        more = message.get("more_body", False)
    path = scope["path"]
    if path == "/v1/pose/frames":
        status, body = 202, ACK
    elif path.startswith("/v1/sessions/"):
        status, body = 200, ENDED
    elif path in ("/v1/healthz", "/v1/readyz"):  # readyz: the router's check
        status, body = 200, HEALTHY
    else:
        status, body = 404, b"{}"
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def config(port: int) -> Config:
    c = Config()
    c.bind = [f"127.0.0.1:{port}"]
    c.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    c.graceful_timeout = GRACEFUL_TIMEOUT_S
    c.backlog = BACKLOG
    c.accesslog = None
    c.websocket_max_message_size = Settings.max_body_bytes
    c.websocket_ping_interval = WEBSOCKET_PING_S
    c.errorlog = logging.getLogger("hypercorn.error")
    return c


async def main(port: int, which: str) -> None:
    app = quart_app() if which == "quart" else raw_app
    stop = trio.Event()

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        await serve(app, config(port), shutdown_trigger=stop.wait)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--app", choices=("quart", "raw"), default="quart")
    a = p.parse_args()
    trio.run(main, a.port, a.app)
