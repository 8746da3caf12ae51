"""ASGI wrapper that makes ``Connection: close`` actually close the socket.

The trap (quart-trio 0.12 on hypercorn's trio worker): when a response ends on a
connection that must close, hypercorn closes the socket from *inside* the app's
final ``send`` call. That same call delivers ``http.disconnect`` to quart-trio's
receive task, which cancels the request's nursery at once, cancelling hypercorn's
``send_eof``/``aclose`` half-way: the socket stays open until the keep-alive
timeout. Health checkers that send ``Connection: close`` then pile up sockets.

The fix holds ``http.disconnect`` back from the app until its final ``send`` has
returned, so the close runs to completion; a disconnect that comes before the
response has started is passed through at once, so an abandoned request is still
cancelled promptly.
"""

from __future__ import annotations

from typing import Any

import trio

ASGIApp = Any


def close_on_connection_close(app: ASGIApp) -> ASGIApp:
    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        responding = False
        final_sent = trio.Event()

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal responding
            if message["type"] == "http.response.start":
                responding = True
            try:
                await send(message)
            finally:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    final_sent.set()

        async def guarded_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect" and responding:
                await final_sent.wait()
            return message

        await app(scope, guarded_receive, guarded_send)

    return wrapped
