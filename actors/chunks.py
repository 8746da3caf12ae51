"""Chunked application of a session's pose batches (mixed into the session actor).

Batches that are ready in sequence order go into the replay at once (the record of
what was acknowledged) and wait for the metrics, pose statistics and repetitions,
until :data:`CHUNK_BATCHES` are pending or the oldest has waited
:data:`CHUNK_DELAY_S`, whichever comes first; always before the session is finalised
and before an admin snapshot. One engine call per chunk amortises the per-call cost
(``bench/bench_actor_cpu.py``, ``--chunk``); the results are exactly those of one
call per batch, since both the rep engine and :class:`~actors.pose_stats.PoseStats`
are invariant under how frames are split into calls. The delay is documented in
``docs/rep-engine.md`` ("Emission delay").

Everything here is synchronous and never awaits: nothing to cancel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from actors.pose_stats import PoseStats
from actors.reps import RepEngine
from domain.pose_batch import PoseBatch
from storage.replay import ReplayWriter

log = logging.getLogger("telemetry.actor")

CHUNK_BATCHES = 4
CHUNK_DELAY_S = 3.0


class ChunkedApply:
    """The actor's pending chunk; the session actor provides the attributes below."""

    stats: PoseStats
    reps: RepEngine | None
    replay: ReplayWriter | None
    log_id: str
    error: str | None
    end_reason: str | None
    chunk_batches: int
    chunk_delay_s: float
    _pending: list[tuple[Any, Any]]
    _pending_since: float | None

    if TYPE_CHECKING:
        def request_end(self, reason: str) -> None: ...

    def _record(self, batch: PoseBatch) -> None:
        # The replay first, at once: it is the record of what was acknowledged, and
        # must survive a failure in the metrics. Metrics are computed on the frames
        # as stored, so `telemetry replay` reproduces them exactly.
        assert self.replay is not None
        frames = self.replay.append(batch.t_ms, batch.frames)
        if not self._pending:
            self._pending_since = trio.current_time()
        self._pending.append((batch.t_ms, frames))

    def _apply_due(self) -> None:
        """Apply the pending chunk if it is full or its oldest batch waited long enough."""
        if self._pending and (
                len(self._pending) >= self.chunk_batches
                or trio.current_time() >= self._pending_since + self.chunk_delay_s):
            self._apply_chunk()

    def apply_pending(self) -> None:
        """Apply the pending chunk now, outside the actor's loop (an admin read).
        Never raises: a failure ends the session as ``actor_error``, logged."""
        try:
            self._apply_chunk()
        except Exception as exc:
            log.exception("applying a chunk failed; session ends",
                          extra={"session": self.log_id})
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            self.reps = None
            self.request_end("actor_error")

    def _apply_chunk(self) -> None:
        """Pose statistics and repetitions of the pending batches, in one call each.

        Both give exactly what one call per batch would (batch-split invariance,
        tests/actors/test_reps_split.py and test_chunks.py)."""
        chunk, self._pending, self._pending_since = self._pending, [], None
        if not chunk:
            return
        if len(chunk) == 1:
            (t_ms, frames), = chunk
            sizes = None
        else:
            t_ms = np.concatenate([t for t, _ in chunk])
            frames = np.concatenate([f for _, f in chunk])
            sizes = [len(t) for t, _ in chunk]
        self.stats.add(t_ms, frames, sizes)
        if self.reps is None:
            return
        try:
            self.reps.feed(t_ms, frames)  # feed converts to float64 once
        except Exception as exc:
            log.exception("rep engine failed; session ends", extra={"session": self.log_id})
            self.error = f"{type(exc).__name__}: {exc}"
            self.reps = None
            self.end_reason = "actor_error"
