"""A real service on a loopback port, for end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from actors.supervisor import Supervisor
from storage.bus import InProcessBus
from telemetry.app import AppState
from telemetry.config import Settings
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
