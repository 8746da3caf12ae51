"""Waiting for things: the one readiness wait for a server, and :func:`poll`.

Both wait on the Trio clock, so under ``autojump_clock`` a wait that cannot succeed
ends at once instead of after its timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import trio


class NotReady(AssertionError):
    """A server did not answer its readiness URL in time, or its process exited first.
    An ``AssertionError``, so pytest shows it as the failed check it is."""


def _no_exit() -> int | None:
    return None


def _no_log() -> str:
    return ""


async def wait_ready(url: str, *, timeout_s: float, exited: Callable[[], int | None] = _no_exit,
                     log: Callable[[], str] = _no_log, any_answer: bool = False,
                     interval_s: float = 0.05) -> float:
    """Poll ``GET url`` until it answers 200 (any answer if ``any_answer``); return the
    seconds it took. ``exited()`` returns the server process's exit code, or None while
    it runs: an exit ends the wait at once. Raises :class:`NotReady` with the tail of
    ``log()`` on an exit or after ``timeout_s``. Connection errors while the server
    starts are expected and retried. On cancellation the client is closed and the
    cancellation propagates."""
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=2) as client:
        with trio.move_on_after(timeout_s):
            while True:
                code = exited()
                if code is not None:
                    raise NotReady(f"{url}: the process exited with {code} before it was "
                                   f"ready:\n{log()[-3000:]}")
                try:
                    r = await client.get(url)
                    if any_answer or r.status_code == 200:
                        return time.monotonic() - t0
                except httpx.TransportError:
                    pass
                await trio.sleep(interval_s)
    raise NotReady(f"{url} was not ready in {timeout_s} s:\n{log()[-3000:]}")


async def poll(fn: Any, timeout_s: float, interval_s: float = 0.1) -> Any:
    """Call (and await, if async) ``fn`` until it returns something truthy; return
    that. ``trio.TooSlowError`` after ``timeout_s``."""
    with trio.fail_after(timeout_s):
        while True:
            got = fn()
            if hasattr(got, "__await__"):
                got = await got
            if got:
                return got
            await trio.sleep(interval_s)
