"""The HTTP bus transport: deliver each event to the Core API's internal endpoint.

Each :meth:`HttpBus.publish` POSTs the event as JSON with ``Authorization: Bearer
<service-account token>`` (asked of ``token_provider`` on every attempt, so a rotated
token is picked up) and ``Idempotency-Key: <event_id>``; the receiver stores an
event at most once per session, so retrying is always safe.

Retried, with exponential backoff and jitter (``trio.sleep``, so a test clock can
drive it): connection failures and timeouts, 408, 429 and every 5xx. A
``Retry-After`` header (seconds) raises the next delay, capped at ``max_delay_s``.
Any other non-2xx answer fails at once, without retrying here. 400, 413 and 422 mean
the receiver has judged *the event* and sending it again will not change its mind:
they raise :class:`~storage.bus.EventRejected`, which the outbox treats as final
(moved to ``dead/`` at once). Other answers (401/403: our token, 404/405: the URL,
...) are about this sender's configuration, not the event, so they raise a plain
:class:`BusError` and the outbox retries them with its backoff. An event without an
``event_id`` or not JSON-serialisable can never be sent: ``EventRejected`` too.
After ``max_attempts`` failed attempts :class:`BusError` is raised with the last
failure.

Cancellation propagates unchanged; a cancelled publish may or may not have been
delivered (the caller re-publishes; the idempotency key makes that harmless).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable

import httpx
import trio

from storage.bus import BusError, Event, EventRejected

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429})
# The receiver refuses the event itself: final, whoever sends it and whenever.
REJECTED_STATUS = frozenset({400, 413, 422})


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
    return value if value >= 0 else None


class HttpBus:
    """Bus transport over HTTP. Owns its ``httpx.AsyncClient`` unless one is given."""

    def __init__(
        self,
        *,
        url: str,
        token_provider: Callable[[], str],
        max_attempts: int = 6,
        timeout_s: float = 10.0,
        client: httpx.AsyncClient | None = None,
        base_delay_s: float = 0.25,
        max_delay_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.url = url
        self._token_provider = token_provider
        self.max_attempts = max_attempts
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(
            timeout=self._timeout, follow_redirects=False
        )
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._rng = rng or random.Random()
        self.published = 0
        self.retries = 0

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before attempt ``attempt + 1``: ``base * 2**(attempt-1)`` capped at
        ``max_delay_s``, jittered into its upper half; at least ``Retry-After``."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay_s))
        return delay

    async def publish(self, event: Event) -> None:
        """Deliver ``event``; return once the receiver answered 2xx. See module doc."""
        key = event.get("event_id")
        if not isinstance(key, str) or not key:
            raise EventRejected("event has no event_id to use as its idempotency key")
        try:
            body = json.dumps(event, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise EventRejected(f"event is not JSON-serialisable: {exc}") from exc
        last = "no attempt made"
        # What the warning line says: the status or the error type only. The
        # receiver's body may echo the event (ids), and so may an error's text.
        brief = last
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                token = self._token_provider()
            except Exception as exc:
                raise BusError(f"no service token: {type(exc).__name__}: {exc}") from exc
            headers = {
                "Authorization": f"Bearer {token}",
                "Idempotency-Key": key,
                "Content-Type": "application/json",
            }
            try:
                resp = await self._client.post(
                    self.url, content=body, headers=headers, timeout=self._timeout
                )
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                brief = type(exc).__name__
            else:
                if resp.is_success:
                    self.published += 1
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                brief = f"HTTP {resp.status_code}"
                # no event id in the messages: it names the session (org and id)
                if resp.status_code in REJECTED_STATUS:
                    raise EventRejected(f"receiver rejected the event: {last}")
                if resp.status_code not in RETRYABLE_STATUS and resp.status_code < 500:
                    raise BusError(f"receiver rejected the event: {last}")
                retry_after = _retry_after(resp)
            if attempt == self.max_attempts:
                break
            delay = self.backoff(attempt, retry_after)
            self.retries += 1
            log.warning("bus delivery failed; retrying",
                        extra={"attempt": attempt, "delay_s": round(delay, 3), "error": brief})
            await trio.sleep(delay)
        raise BusError(f"gave up on the event after {self.max_attempts} attempts: {last}")

    async def aclose(self) -> None:
        """Close the owned HTTP client (shielded, bounded). Idempotent."""
        if not self._owns_client:
            return
        with trio.move_on_after(5) as cs:
            cs.shield = True
            await self._client.aclose()

    def __repr__(self) -> str:  # never shows a token
        return f"HttpBus(url={self.url!r}, max_attempts={self.max_attempts})"
