"""Running asyncio code (the nats-py client) from Trio: two bridges, one interface.

nats-py is an asyncio library; the service is Trio. A :class:`Bridge` gives the
journal three things:

* :meth:`Bridge.call` - run a coroutine on the asyncio loop and wait for its result
  without blocking the Trio loop;
* :meth:`Bridge.post` - schedule a plain callable on the asyncio loop, in FIFO order
  with every other ``post`` (this is what keeps a key's publishes in call order);
* :meth:`Bridge.wait` - wait, from Trio, for a :class:`concurrent.futures.Future`
  that the asyncio side completes.

Two implementations, chosen by name in :func:`open_bridge`:

* ``"thread"`` (:class:`ThreadBridge`): a dedicated asyncio event loop in its own
  thread. Trio hands work over with ``call_soon_threadsafe`` and is woken by the
  future's done callback through its :class:`trio.lowlevel.TrioToken`; no Trio
  worker thread is held while waiting.
* ``"trio-asyncio"`` (:class:`TrioAsyncioBridge`): trio-asyncio's loop, running as
  Trio tasks in the Trio thread.

Cancellation: a cancelled :meth:`Bridge.call` cancels the asyncio task and raises
``trio.Cancelled`` at once (it does not wait for the task to notice); a cancelled
:meth:`Bridge.wait` cancels the future (if not yet running) and raises. Errors
raised by the coroutine are re-raised unchanged in the Trio caller.

The default and why is in :mod:`storage.jetstream` (measured by
``bench/bench_journal.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import trio

T = TypeVar("T")

BRIDGES = ("thread", "trio-asyncio")
STOP_TIMEOUT_S = 5.0

log = logging.getLogger("telemetry.journal")


class Bridge(Protocol):
    """What the JetStream journal needs of an asyncio bridge (see the module docstring)."""

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T: ...

    def post(self, fn: Callable[[], None]) -> None: ...

    async def wait(self, fut: concurrent.futures.Future[T]) -> T: ...


async def _wait_future(fut: concurrent.futures.Future[T]) -> T:
    """Wait for ``fut`` on the Trio loop; cancelled: cancel ``fut`` and raise."""
    if not fut.done():
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:  # the Trio run is gone; nobody waits
                pass

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            fut.cancel()
            raise
    return fut.result()


class ThreadBridge:
    """A private asyncio loop in a daemon thread (see the module docstring)."""

    def __init__(self) -> None:
        # The class, not asyncio.new_event_loop(): once trio_asyncio is imported, that
        # refuses to run inside a Trio thread.
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._run, name="nats-asyncio", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                # Bounded: a nats-py task reconnecting to a cluster that is down was
                # seen to outlive its cancellation, which hung the join below for good.
                _, stuck = self.loop.run_until_complete(
                    asyncio.wait(pending, timeout=STOP_TIMEOUT_S))
                if stuck:
                    # The loop stays open: closing it under live tasks raises.
                    log.warning("%d asyncio tasks did not stop; abandoned", len(stuck))
                    pending = stuck
            if not pending or not any(not t.done() for t in pending):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Stop the loop (its remaining tasks are cancelled, for at most
        :data:`STOP_TIMEOUT_S`) and join the thread (as long again at most: a daemon
        thread still running then is left behind, never waited for without end)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            await trio.to_thread.run_sync(self._thread.join, 2 * STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("the journal's asyncio thread did not stop; left behind")

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await fn()

        return await _wait_future(asyncio.run_coroutine_threadsafe(run(), self.loop))

    def post(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(fn)

    async def wait(self, fut: concurrent.futures.Future[T]) -> T:
        return await _wait_future(fut)


class TrioAsyncioBridge:
    """trio-asyncio's loop in the Trio thread (see the module docstring)."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        import trio_asyncio

        async def run() -> T:
            return await fn()

        result: T = await trio_asyncio.aio_as_trio(run)()
        return result

    def post(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon(fn)

    async def wait(self, fut: concurrent.futures.Future[T]) -> T:
        return await _wait_future(fut)


@asynccontextmanager
async def open_bridge(kind: str = "thread") -> AsyncIterator[Bridge]:
    """A running bridge of ``kind`` (one of :data:`BRIDGES`), stopped on exit (its
    asyncio tasks are cancelled). ValueError for an unknown kind."""
    if kind == "thread":
        bridge = ThreadBridge()
        bridge.start()
        try:
            yield bridge
        finally:
            with trio.CancelScope(shield=True):
                await bridge.stop()
    elif kind == "trio-asyncio":
        import trio_asyncio

        async with trio_asyncio.open_loop() as loop:
            yield TrioAsyncioBridge(loop)
    else:
        raise ValueError(f"unknown asyncio bridge {kind!r}; one of {BRIDGES}")
