"""ASGI types and the small scope helpers the raw-ASGI parts of the app share
(CORS, TLS, the request pipeline), and the client address behind trusted proxies.

**Client address.** Behind the ALB and the router the TCP peer is a proxy; the
browser's address is in ``X-Forwarded-For``, where every proxy appends the address it
received the request from. Anyone can send that header, so it is believed only across
hops the operator named (``TELEMETRY_TRUSTED_PROXIES``, CIDRs): :func:`trusted_client`
walks the list from the right, past the peer and every address inside a trusted
network, and the first address outside them is the client. It rewrites the ASGI
``client`` once, so everything that reads the address (:func:`client_of`, Quart's
``request.remote_addr``) gets the same answer. The address is still only logged
truncated (:func:`domain.privacy.truncate_ip`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def client_of(scope: Scope) -> str | None:
    """The client's address, if the server gave one: the peer's, or the one
    :func:`trusted_client` found behind trusted proxies."""
    client = scope.get("client")
    return client[0] if client else None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FORWARDED_FOR = b"x-forwarded-for"


def parse_networks(value: str) -> tuple[Network, ...]:
    """``TELEMETRY_TRUSTED_PROXIES``: comma-separated CIDRs (a bare address is a /32 or
    /128), blanks ignored, deduplicated in order. :class:`ValueError` names a bad one;
    host bits set (``10.0.0.5/16``) are refused as the likely typo they are."""
    out: list[Network] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError:
            raise ValueError(f"{item[:60]!r} is not a network like 10.0.0.0/16 or "
                             "fd00::/8 (host bits must be zero)") from None
        if net not in out:
            out.append(net)
    return tuple(out)


def _address(text: str) -> IPAddress | None:
    """An ``X-Forwarded-For`` entry as an address: bare, ``[v6]``, ``v4:port`` or
    ``[v6]:port``; IPv4-mapped IPv6 as IPv4. ``None`` if it is none of these."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def forwarded_client(peer: str, forwarded_for: Iterable[str],
                     trusted: tuple[Network, ...]) -> str:
    """The client's address: ``peer`` unless it is a trusted proxy; then, going right
    to left through ``forwarded_for`` (the header's values, in order), the first
    address outside the trusted networks -- or the left-most if all are inside. A
    malformed entry ends the walk at the trusted hop that passed it on."""
    ip = _address(peer)
    if ip is None or not any(ip in net for net in trusted):
        return peer
    client = str(ip)
    hops = [h for value in forwarded_for for h in value.split(",")]
    for hop in reversed(hops):
        ip = _address(hop)
        if ip is None:
            break
        client = str(ip)
        if not any(ip in net for net in trusted):
            break
    return client


def trusted_client(app: ASGIApp, trusted: Iterable[Network]) -> ASGIApp:
    """``app`` with each HTTP and WebSocket scope's ``client`` set to
    :func:`forwarded_client`'s answer; ``app`` itself when nothing is trusted."""
    nets = tuple(trusted)
    if not nets:
        return app

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("client")
        if peer and scope["type"] in ("http", "websocket"):
            # Every X-Forwarded-For line, in order: a proxy may add its own line
            # (HAProxy's `option forwardfor` does) rather than extend the last one.
            values = [v.decode("latin-1") for k, v in scope.get("headers") or ()
                      if k.lower() == FORWARDED_FOR]
            client = forwarded_client(peer[0], values, nets)
            if client != peer[0]:
                scope = {**scope, "client": (client, 0)}
        await app(scope, receive, send)

    return wrapped
