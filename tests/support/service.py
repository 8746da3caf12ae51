"""A real service on a loopback port in this process, for end-to-end tests; and the
same with the CORS wrapper around the app, with a log of the requests it saw.

``python -m tests.support.service serve`` runs ``telemetry serve`` with the CORS wrapper
around the app (origins from ``TELEMETRY_CORS_ORIGINS``), as the service will once the
wrapper is wired into ``telemetry/server.py``; the browser restart test runs it as a
child (:class:`tests.support.processes.ServiceProcess`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from actors.supervisor import Supervisor
from storage.bus import InProcessBus
from telemetry.app import AppState
from telemetry.config import Settings
from telemetry.cors import ASGIApp, cors, parse_origins
from telemetry.server import serve
from telemetry.wiring import Storage, open_storage


@dataclass
class Running:
    settings: Settings
    storage: Storage
    port: int
    client: httpx.AsyncClient
    events: list[dict[str, Any]] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)
    state: AppState | None = None

    @property
    def supervisor(self) -> Supervisor:
        assert self.state is not None
        return self.state.supervisor

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_service(settings: Settings, *,
                          websocket_ping_s: float | None = 0.25) -> AsyncIterator[Running]:
    """Serve until the block exits, then shut down in order and wait for it.

    WebSocket pings every 0.25 s by default, not the service's 20 s: hypercorn's
    ping task sleeps a whole interval and holds its connection open at shutdown
    until the graceful timeout (5 s) cancels it, which cost every stream test 5 s.
    ``None``: no pings."""
    async with open_storage(settings) as storage, trio.open_nursery() as nursery:
        run: Running | None = None
        done = trio.Event()

        async def host(*, task_status: trio.TaskStatus[AppState]) -> None:
            try:
                assert run is not None
                await serve(settings, storage, stop=run.stop,
                            websocket_ping_s=websocket_ping_s, task_status=task_status)
            finally:
                done.set()

        events: list[dict[str, Any]] = []

        async def collect(event: Any) -> None:
            events.append(dict(event))

        if isinstance(storage.transport, InProcessBus):
            storage.transport.subscribe(collect)
        client = httpx.AsyncClient(timeout=20)
        run = Running(settings, storage, 0, client, events)
        run.state = await nursery.start(host)
        run.port = run.state.port
        client.base_url = httpx.URL(run.url)
        try:
            yield run
        finally:
            run.stop.set()
            await done.wait()
            await client.aclose()


# -- the service with CORS --------------------------------------------------------------


@dataclass
class Request:
    """One request as the service saw it (``t`` on the Trio clock)."""

    method: str
    path: str
    started: float
    body: bytes = b""
    status: int | None = None
    answered: float | None = None

    @property
    def seq(self) -> int | None:
        """The sequence number of a pose batch."""
        if self.path == "/v1/pose/frames" and len(self.body) >= 12:
            return int.from_bytes(self.body[8:12], "little")
        return None


@dataclass
class RequestLog:
    """An ASGI wrapper that records every request and its answer's status."""

    requests: list[Request] = field(default_factory=list)

    def posts(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            req = Request(scope["method"], scope["path"], trio.current_time())
            self.requests.append(req)

            async def recv() -> Any:
                message = await receive()
                if message["type"] == "http.request":
                    req.body += message.get("body", b"")
                return message

            async def snd(message: Any) -> None:
                if message["type"] == "http.response.start":
                    req.status, req.answered = message["status"], trio.current_time()
                await send(message)

            await app(scope, recv, snd)

        return wrapped


@contextmanager
def cors_wired(origins: Sequence[str], log: RequestLog | None = None) -> Iterator[None]:
    """While open, :func:`telemetry.server.serve` wraps its app in :func:`cors`: the one
    line the lead adds to ``server.py`` (``cors(create_app(state), settings.cors_origins)``),
    applied here from outside because tests may not edit ``server.py``. ``log``, if
    given, records the requests (outside CORS, so preflights too)."""
    import telemetry.server as server

    original = server.create_app

    def create_app(state: Any) -> ASGIApp:
        app = cors(original(state), origins)
        return log.wrap(app) if log is not None else app

    server.create_app = create_app  # type: ignore[assignment]
    try:
        yield
    finally:
        server.create_app = original


@asynccontextmanager
async def running_cors_service(settings: Settings, origins: Sequence[str],
                               log: RequestLog | None = None) -> AsyncIterator[Running]:
    """:func:`running_service` with the CORS wrapper around the app."""
    with cors_wired(origins, log):
        async with running_service(settings) as svc:
            yield svc


def _serve_main() -> None:
    origins = parse_origins(os.environ.get("TELEMETRY_CORS_ORIGINS", ""))
    from telemetry.cli import main

    with cors_wired(origins):
        code = main(["serve"])
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m tests.support.service serve")
    _serve_main()
