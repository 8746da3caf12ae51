"""The actors' own settings: the few limits and timings they read.

The entry point builds one from the service configuration
(:func:`telemetry.wiring.actor_limits`), so that ``actors/`` depends on no module of
``telemetry/``. Frozen: a running supervisor and its actors share one value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ActorLimits:
    """What the supervisor and its session actors need of the configuration (each
    field means what the ``TELEMETRY_*`` setting of the same name does)."""

    data_dir: Path = Path(".telemetry-data")  # the replay spill files go under it
    mailbox_size: int = 16
    reorder_window: int = 8
    max_batches_per_s: float = 5.0
    gap_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_session_s: float = 7200.0
    ended_retention_s: float = 3600.0
    shutdown_deadline_s: float = 25.0
    shutdown_mode: str = "flush"  # "flush" (hand sessions over to the journal) | "finalise"
    max_live_sessions: int = 5000
    max_sessions_per_org: int = 1000
    blob_encoding: str | None = None  # None: the replay writer's default
    lease_s: float = 10.0  # fleet mode only, as orphan_grace_s
    orphan_grace_s: float = 30.0
