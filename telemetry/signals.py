"""SIGTERM/SIGINT as a Trio event: how the entry points learn to shut down."""

from __future__ import annotations

import signal

import trio


async def set_on_signal(stop: trio.Event) -> None:
    """Set ``stop`` on the first SIGTERM or SIGINT, then return. Must run in the main
    thread (Trio's signal receiver); cancellation just stops listening."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return
