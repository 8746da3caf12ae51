"""Refuse the WebSocket ``permessage-deflate`` extension (hypercorn offers it).

hypercorn 0.18 accepts ``permessage-deflate`` whenever a client offers it (browsers
always do), and wsproto inflates each received chunk with no output bound: about
64 KiB off the wire can become about 64 MiB in memory before hypercorn's message
size cap sees it. The pose stream carries float batches that deflate hardly
shrinks, so compression would also cost CPU for nothing. The POST path refuses
compressed bodies (415) for the same reasons.

hypercorn has no setting for it, so :func:`refuse_permessage_deflate` makes its
handshake ignore the client's ``Sec-WebSocket-Extensions`` offer: the server's
answer then names no extension and, per RFC 7692, the client must not compress.
``tests/telemetry/test_stream.py`` checks this against the installed hypercorn.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_telemetry_refuses_deflate"


def refuse_permessage_deflate() -> None:
    """Make hypercorn's WebSocket handshakes negotiate no extension. Idempotent."""
    from hypercorn.protocol import ws_stream

    handshake = ws_stream.Handshake
    if getattr(handshake, _PATCHED, False):
        return
    original = handshake.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.extensions = None  # as if the client had offered none

    handshake.__init__ = __init__  # type: ignore[method-assign]
    setattr(handshake, _PATCHED, True)
