"""Recompute a finished session's metrics from its replay blob.

Support staff use this (``telemetry replay``) to see what happened in a session.
The live actor feeds its engines exactly the frames the blob will decode to (see
:meth:`storage.replay.ReplayWriter.append`), and the rep engine's results do not
depend on how frames are split into batches, so the recomputed rep metrics equal
the live ones exactly.
"""

from __future__ import annotations

from typing import Any

from actors.pose_stats import PoseStats
from actors.reps import RepEngine
from storage.replay import Replay


def recompute(replay: Replay) -> dict[str, Any]:
    """Return ``{"session_id", "org_id", "exercise", "pose", "reps"}`` for ``replay``.

    Raises ``ValueError`` if the header's exercise or image size is malformed."""
    h = replay.header
    meta = h.meta or {}
    ex = meta.get("exercise") or {}
    width, height = meta.get("image_width") or 0, meta.get("image_height") or 0
    engine = RepEngine(
        ex.get("kind"), side=ex.get("side"), space=h.space,
        aspect=width / height if height else 1.0, target_reps=ex.get("target_reps"),
    )
    stats = PoseStats()
    if len(replay.t_ms):
        engine.feed(replay.t_ms, replay.frames)
        stats.add(replay.t_ms, replay.frames)
    engine.finish()
    pose = stats.to_dict()
    del pose["batches"]  # batch boundaries are not kept in the blob
    return {
        "session_id": h.session_id,
        "org_id": h.org_id,
        "exercise": ex,
        "encoding": h.encoding,
        "pose": {"space": h.space, **pose},
        "reps": engine.summary(),
    }
