"""Session level of the media metrics: view summaries for the sink, and the pose side
of stalls (the views themselves are held by :class:`actors.media_tracker.MediaTracker`).

:func:`sink_view` reshapes a view summary for ``storage/sink.py``;
:func:`pose_during_stalls` answers what no video-analytics product can, because none
sees the camera: did the patient keep exercising while the video froze? That answer is
a heuristic built only from the rep engine's rep intervals and the genuine (not
seek-induced) stall intervals, both on the client clock (ms since the exercise session
started). Definitions, and why they are heuristics, are in ``docs/media-metrics.md``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[int, int]]:
    """Sorted, overlap-merged ``(start, end)`` intervals; empty or inverted ones dropped."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def iso_ms(ts: float) -> str:
    """UTC ISO-8601 with milliseconds (the format of ``actors.summary.iso_time``)."""
    d = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{d.microsecond // 1000:03d}Z"


def pose_during_stalls(
    stalls: list[tuple[int, int]],
    reps: list[Mapping[str, Any]],
    pose_activity: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Correlate genuine video stalls with the repetitions the patient performed.

    ``stalls``: (start_ms, end_ms) client-clock intervals (e.g. ``MediaTracker.stalls()``).
    ``reps``: the rep engine's per-rep dicts; only ``start_ms`` and ``end_ms`` are read
    (a rep whose end is before its start is treated as instantaneous at its start).
    ``pose_activity``: (first, last) pose-frame time of the session; stalls are clipped
    to it, since outside it nothing can be said. If None, the span of the reps is used.

    Returns ``stall_count``, ``stall_ms`` (after merging and clipping),
    ``reps_during_stalls`` (reps overlapping a stall), ``rep_rate_per_min`` (reps not
    overlapping a stall per minute of non-stall time in the span), ``stalls_paused``
    and ``paused_during_stall`` (a stall with no overlapping rep, reps both before and
    after it, and at least one rep expected in it at that rate), and
    ``missed_reps_estimate`` (sum over stalls of rate x stall length minus the reps
    overlapping it, floored at 0). Rates and estimates are None without reps.
    """
    spans = sorted((float(r["start_ms"]), max(float(r["start_ms"]), float(r["end_ms"])))
                   for r in reps)
    result: dict[str, Any] = {
        "stall_count": 0, "stall_ms": 0, "reps_during_stalls": 0, "rep_rate_per_min": None,
        "stalls_paused": 0, "paused_during_stall": False, "missed_reps_estimate": None,
        "method": "heuristic-v1",
    }
    if pose_activity is None:
        if not spans:
            return result
        pose_activity = (spans[0][0], max(e for _, e in spans))
    lo, hi = pose_activity
    clipped = merge_intervals((max(a, lo), min(b, hi)) for a, b in stalls)
    if not clipped:
        return result
    stall_ms = sum(b - a for a, b in clipped)
    overlaps = [[i for i, (s, e) in enumerate(spans) if s < b and e > a] for a, b in clipped]
    during = {i for group in overlaps for i in group}
    outside_ms = (hi - lo) - stall_ms
    rate = (len(spans) - len(during)) / outside_ms if outside_ms > 0 else None
    result.update(stall_count=len(clipped), stall_ms=stall_ms, reps_during_stalls=len(during))
    if not spans or rate is None:
        return result
    paused = 0
    missed = 0.0
    for (a, b), group in zip(clipped, overlaps, strict=True):
        expected = rate * (b - a)
        missed += max(0.0, expected - len(group))
        before = any(e <= a for _, e in spans)
        after = any(s >= b for s, _ in spans)
        if not group and before and after and expected >= 1.0:
            paused += 1
    result.update(rep_rate_per_min=round(rate * 60_000, 2), stalls_paused=paused,
                  paused_during_stall=paused > 0, missed_reps_estimate=round(missed, 2))
    return result


def sink_view(summary: dict[str, Any], t0_wall: float) -> dict[str, Any]:
    """A view summary in the shape ``storage/sink.py`` reads: wall-clock ``started_at``
    / ``ended_at`` and a ``buffering`` list with ``started_at``. ``t0_wall`` is the
    Unix time of client ``t_ms == 0`` (the exercise session's start)."""
    out = {k: v for k, v in summary.items() if k != "buffering_events"}
    for key, t_key in (("started_at", "started_t_ms"), ("ended_at", "ended_t_ms")):
        t = summary.get(t_key)
        out[key] = None if t is None else iso_ms(t0_wall + t / 1000)
    out["buffering"] = [{**b, "started_at": iso_ms(t0_wall + b["started_t_ms"] / 1000)}
                        for b in summary.get("buffering_events", [])]
    return out
