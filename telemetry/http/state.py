"""What the HTTP handlers share: one :class:`AppState` per running app.

A plain holder, imported by the handlers and built by the entry point
(:mod:`telemetry.server`); it imports no handler module, so it is no import hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from actors.supervisor import Supervisor
from domain.privacy import Pseudonymiser
from telemetry.auth import TokenVerifier
from telemetry.config import Settings
from telemetry.metrics import Metrics

if TYPE_CHECKING:
    from telemetry.wiring import Storage


class Streams(Protocol):
    """What shutdown needs of the open pose streams (``telemetry.stream.PoseStream``)."""

    def close_all(self) -> None: ...


@dataclass
class AppState:
    settings: Settings
    supervisor: Supervisor
    verifier: TokenVerifier
    pseudonyms: Pseudonymiser
    ready: bool = True
    port: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    # The storage the supervisor uses, for scrape-time spool and outbox figures; when
    # None they are taken from the supervisor's own spool and bus.
    storage: Storage | None = None
    # The pose streams (WebSocket), so that shutdown can close them; set by create_app.
    streams: Streams | None = None
