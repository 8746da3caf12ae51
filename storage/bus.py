"""The events bus: how a finished session's summary leaves this service.

:class:`Bus` is the interface; :class:`InProcessBus` is the embedded transport,
which hands each event straight to the subscribers living in this process (the
aggregate sink in embedded mode). The HTTP transport to the Core API lives in
:mod:`storage.http_bus`.

``publish`` returns only once every subscriber has taken the event; if one raises,
``publish`` raises :class:`BusError` and the caller keeps the event to retry, unless
it raised :class:`EventRejected` (the event itself is refused for good), which
``publish`` passes on unchanged so the caller can set the event aside at once.
Subscribers must therefore be idempotent on ``event["event_id"]``. Cancellation
propagates unchanged; a cancelled publish may or may not have been delivered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

Event = Mapping[str, Any]
Subscriber = Callable[[Event], Awaitable[None]]


class BusError(Exception):
    """An event could not be delivered; it was not (known to be) accepted."""


class EventRejected(BusError):
    """The receiver judged this event and will never accept it (malformed, or a value
    its store cannot hold): resending cannot help, so it is not retried. Outages,
    timeouts and the receiver's own faults are plain :class:`BusError`."""


class Bus(Protocol):
    async def publish(self, event: Event) -> None: ...

    async def aclose(self) -> None: ...


class InProcessBus:
    """Delivers events to in-process subscribers, in subscription order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self.published = 0

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    async def publish(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                await subscriber(event)
            except EventRejected:
                raise
            except Exception as exc:
                raise BusError(f"subscriber failed: {type(exc).__name__}: {exc}") from exc
        self.published += 1

    async def aclose(self) -> None:
        self._subscribers.clear()
