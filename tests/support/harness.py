"""A supervisor with in-memory blob store and bus, no HTTP: the actor tests' subject."""

from __future__ import annotations

from typing import Any

from actors.supervisor import Supervisor
from domain.claims import SessionClaims
from domain.pose_batch import decode_batch
from domain.privacy import Pseudonymiser
from storage.blobs import MemoryBlobStore
from storage.bus import InProcessBus
from telemetry.auth import TokenVerifier
from telemetry.config import Settings
from telemetry.wiring import actor_limits
from tests.support.payloads import batch_body, session_token


class Harness:
    def __init__(self, settings: Settings, store: Any = None) -> None:
        self.settings = settings
        self.store = store or MemoryBlobStore()
        self.bus = InProcessBus()
        self.events: list[dict[str, Any]] = []
        self.bus.subscribe(self._collect)
        self.sup = Supervisor(actor_limits(settings), store=self.store, bus=self.bus,
                              pseudonyms=Pseudonymiser(b"k" * 32))

    async def _collect(self, event: Any) -> None:
        self.events.append(dict(event))

    def claims(self, sid: str = "sess-1", org: str = "org-a") -> SessionClaims:
        tok = session_token(self.settings, session_id=sid, org_id=org)
        return TokenVerifier(self.settings).verify_session(tok)

    def offer(self, claims: SessionClaims, seq: int) -> Any:
        return self.sup.offer(claims, decode_batch(batch_body(seq), max_frames=120))

    def event(self, sid: str) -> dict[str, Any]:
        (e,) = [e for e in self.events if e["session_id"] == sid]
        return e
