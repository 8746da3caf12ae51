"""A simulated video player for the demo and tests: the media events one view emits.

The player asks to play at ``start_ms`` (``session_start``), shows its first frame
after a startup delay, sends a heartbeat every 10 s, crosses the 25/50/75/95 %
milestones, and ends when the session does. On a poor connection it starts slower,
stalls a few times (``buffering_start``/``buffering_end``) and steps its rendition
down. Event times are client ms since the exercise session started, the same clock
as the pose frames, and are batched like a real client would (one batch per ~5 s).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

HEARTBEAT_MS = 10_000


def player_events(
    *, end_ms: int, media_duration_s: float, poor: bool, seed: int, start_ms: int = 300,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    n = 0

    def emit(kind: str, t: float, **fields: Any) -> None:
        nonlocal n
        n += 1
        events.append({"id": f"e{n}", "type": kind, "t_ms": int(t), **fields})

    bitrate = 1_200_000 if poor else 4_500_000
    resolution = "480p" if poor else "1080p"
    ttfb = rng.uniform(400, 900) if poor else rng.uniform(60, 180)
    emit("session_start", start_ms, ttfb_ms=round(ttfb, 1),
         connection_type="3g" if poor else "wifi", position_seconds=0)
    t = start_ms + ttfb + (rng.uniform(1500, 3000) if poor else rng.uniform(200, 500))
    emit("play", t, position_seconds=0)
    pos = 0.0
    stalls = sorted(rng.uniform(t + 3000, end_ms - 3000) for _ in range(3)) if poor else []
    next_hb = start_ms + HEARTBEAT_MS
    stall_count, stall_ms, milestones = 0, 0.0, [25, 50, 75, 95]
    step = 250.0
    while t + step < end_ms and pos < media_duration_s - 0.5:
        t += step
        pos += step / 1000
        if stalls and t >= stalls[0]:
            stalls.pop(0)
            length = rng.uniform(1500, 4000)
            emit("buffering_start", t, position_seconds=round(pos, 2), bitrate_before=bitrate,
                 cdn_response_time_ms=round(rng.uniform(800, 2500), 1))
            t += length
            stall_count += 1
            stall_ms += length
            emit("buffering_end", t, position_seconds=round(pos, 2))
            emit("play", t, position_seconds=round(pos, 2))
            if bitrate > 600_000:
                previous, bitrate, resolution = bitrate, bitrate // 2, "360p"
                emit("quality_change", t + 1, bitrate=bitrate, previous_bitrate=previous,
                     resolution=resolution, position_seconds=round(pos, 2))
                t += 1
        while milestones and pos >= media_duration_s * milestones[0] / 100:
            emit("milestone", t, percent=milestones.pop(0), position_seconds=round(pos, 2))
        if t >= next_hb:
            emit("heartbeat", t, position_seconds=round(pos, 2), buffering_count=stall_count,
                 buffering_duration_ms=round(stall_ms, 1), current_bitrate=bitrate,
                 resolution=resolution, dropped_frames=int(stall_count * 3))
            next_hb += HEARTBEAT_MS
    reason = "completed" if pos >= media_duration_s - 0.5 else "session_ended"
    emit("session_end", t + 1, reason=reason, position_seconds=round(pos, 2),
         buffering_count=stall_count, buffering_duration_ms=round(stall_ms, 1),
         dropped_frames=int(stall_count * 3))
    return events


def batches(events: list[dict[str, Any]], *, media_id: str, view_id: str,
            media_duration_s: float, every_ms: int = 3000) -> Iterator[tuple[int, bytes]]:
    """``(send_at_ms, body)`` pairs: events grouped as a client flushing every ``every_ms``,
    and at once after ``session_end``."""
    group: list[dict[str, Any]] = []
    bucket = None
    for ev in events:
        b = ev["t_ms"] // every_ms
        if bucket is not None and b != bucket and group:
            yield (bucket + 1) * every_ms, _body(group, media_id, view_id, media_duration_s)
            group = []
        bucket = b
        group.append(ev)
    if group:
        yield group[-1]["t_ms"], _body(group, media_id, view_id, media_duration_s)


def _body(events: list[dict[str, Any]], media_id: str, view_id: str, dur: float) -> bytes:
    return json.dumps({"media_id": media_id, "view_id": view_id, "media_duration_s": dur,
                       "events": events}).encode()
