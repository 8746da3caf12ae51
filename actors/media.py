"""Per-media-view QoE metrics, computed incrementally from validated player events.

Definitions (Mux Data / CTA-5004 CMCD vocabulary), the dedupe policy and a worked
example are in ``docs/media-metrics.md``; ``tests/actors/test_media.py`` checks the
same example field by field. Everything here is pure and synchronous: the session's
:class:`actors.media_tracker.MediaTracker` calls :meth:`MediaView.apply` with each
event, :meth:`MediaView.finish` when the exercise session ends, then puts
:meth:`MediaView.summary` into the end-of-session event (via
:func:`actors.media_correlate.sink_view`) and correlates :meth:`MediaView.stalls` with
the rep list (:func:`actors.media_correlate.pose_during_stalls`).

State per view is O(1) apart from two bounded structures: the buffering-event records
(:data:`MAX_BUFFERING_EVENTS`, overflow counted) and the remembered event ids
(:data:`SEEN_IDS`). No method raises on a decoded event; out-of-order, duplicate and
post-end events are counted, not applied.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from domain.media_batch import MediaEvent

SEEK_WINDOW_MS = 2_000  # a stall starting this soon after a seek is seek-induced
# A stall shorter than this (3 frames at 30 fps) is not a rebuffer: browsers fire
# `waiting` for a few ms when the decoder falls behind on a busy CPU with the data
# already buffered, which no viewer sees as a freeze (a late frame counts in
# `dropped_frames`). Its time counts as playing, as if it had not happened.
MIN_STALL_MS = 100
MAX_BUFFERING_EVENTS = 1_000
SEEN_IDS = 1_024
FINISH_GRACE_MS = 15_000  # finish() extends an open interval at most this past the last event
PROGRESS_S = 0.5  # playhead advance that proves frames are being shown

IDLE, STARTING, PLAYING, PAUSED, BUFFERING, STOPPED, ENDED = (
    "idle", "starting", "playing", "paused", "buffering", "stopped", "ended")
_WATCHING = (STARTING, PLAYING, BUFFERING)


@dataclass(slots=True)
class _Stall:
    start: int
    position_s: float
    bitrate: float | None
    cdn_ms: float | None
    after_seek: bool
    startup: bool  # began before the first frame: part of startup time, not a rebuffer


class MediaView:
    """One media view's metrics. Feed events in client-time order with :meth:`apply`."""

    def __init__(self, media_id: str, view_id: str, media_duration_s: float | None) -> None:
        self.media_id = media_id
        self.view_id = view_id
        self.media_duration_s = media_duration_s
        self.state = IDLE
        self._ids: set[str] = set()
        self._id_order: deque[tuple[str, int]] = deque()
        self._hw: int | None = None  # high-water t_ms of applied events
        self._evicted_t: int | None = None  # latest t_ms among forgotten ids
        self.applied = self.duplicates = self.late = self.after_end = 0
        self._clock = 0  # time up to which intervals are accounted
        self._start_t: int | None = None
        self._request_t: int | None = None
        self._first_frame_t: int | None = None
        self._end_t: int | None = None
        self._session_started = False
        self._ttfb: float | None = None
        self._load: float | None = None
        self._conn: str | None = None
        self._start_pos = 0.0
        self._max_pos = 0.0
        self.watch_ms = self.playing_ms = 0
        self._br: float | None = None
        self._br_ms = 0
        self._br_sum = 0.0
        self._stall: _Stall | None = None
        self._stall_starts = 0
        self._closed_buffer_ms = 0
        self.rebuffer_count = self.rebuffer_ms = 0
        self.seek_rebuffer_count = self.seek_rebuffer_ms = 0
        self.seek_count = 0
        self.short_stalls = 0  # under MIN_STALL_MS: neither rebuffers nor records
        self._last_seek_t: int | None = None
        self.upswitches = self.downswitches = 0
        self._resolution: str | None = None
        self._dropped_base = self._dropped_last = 0
        self._client_buf: tuple[int, float] | None = None
        self._milestones: set[int] = set()
        self.error_count = 0
        self._fatal: tuple[str, str] | None = None
        self.startup_failure = self.playback_failure = False
        self.end_reason: str | None = None
        self._records: list[dict[str, Any]] = []
        self.records_dropped = 0

    # -- dedupe ---------------------------------------------------------------------

    def apply(self, event: MediaEvent) -> bool:
        """Apply one event; False if it was not applied.

        Not applied: an id already applied (redelivery), or an event older than the
        newest applied one (late: its metrics would need rewinding), or at/below the
        time of a forgotten id (it might be a forgotten redelivery). Events after the
        view ended are remembered and counted, but change nothing. Never raises.
        """
        t = event.t_ms
        if event.event_id in self._ids:
            self.duplicates += 1
            return False
        if self._hw is not None and (t < self._hw or (self._evicted_t is not None
                                                      and t <= self._evicted_t)):
            self.late += 1
            return False
        self._remember(event.event_id, t)
        if self.state == ENDED:
            self.after_end += 1
            return True
        self.applied += 1
        if self.state == IDLE:
            self.state, self._start_t, self._clock = STARTING, t, t
            if event.type == "session_start":
                self._request_t = t
        getattr(self, "_on_" + event.type)(t, event.fields)
        return True

    def _remember(self, event_id: str, t: int) -> None:
        self._hw = t
        self._ids.add(event_id)
        self._id_order.append((event_id, t))
        if len(self._id_order) > SEEN_IDS:
            old, old_t = self._id_order.popleft()
            self._ids.discard(old)
            self._evicted_t = old_t if self._evicted_t is None else max(self._evicted_t, old_t)

    # -- interval accounting --------------------------------------------------------

    def _advance(self, t: int) -> None:
        dt = t - self._clock
        if dt <= 0:
            return
        if self.state in _WATCHING:
            self.watch_ms += dt
        if self.state == PLAYING:
            self.playing_ms += dt
            if self._br is not None:
                self._br_ms += dt
                self._br_sum += self._br * dt
        self._clock = t

    def _position(self, f: Any, key: str = "position_seconds") -> float | None:
        pos = f.get(key)
        if pos is not None:
            self._max_pos = max(self._max_pos, pos)
        return pos

    def _set_bitrate(self, bitrate: float, previous: float | None = None) -> None:
        before = self._br if self._br is not None else previous
        if before is not None and bitrate > before:
            self.upswitches += 1
        elif before is not None and bitrate < before:
            self.downswitches += 1
        self._br = bitrate

    def _counters(self, f: Any) -> None:
        dropped = f.get("dropped_frames")
        if dropped is not None:
            if dropped < self._dropped_last:  # player re-created: its counter restarted
                self._dropped_base += self._dropped_last
            self._dropped_last = dropped
        if f.get("buffering_count") is not None and f.get("buffering_duration_ms") is not None:
            self._client_buf = (f["buffering_count"], f["buffering_duration_ms"])

    # -- stalls ---------------------------------------------------------------------

    def _infer_end(self, t: int, pos: float, f: Any) -> int:
        """When a stall whose end event was lost ended, given playhead progress at ``t``.

        First choice: the client's cumulative buffering time, if its count agrees with
        ours, minus the stalls we have closed. Fallback: ``t`` minus the progress made
        at 1x. Either way clamped to [max(stall start, last accounted time), t].
        """
        s = self._stall
        assert s is not None
        lo = max(s.start, self._clock)
        count, total = f.get("buffering_count"), f.get("buffering_duration_ms")
        if count == self._stall_starts and total is not None:
            end = s.start + round(total - self._closed_buffer_ms)
            if lo <= end <= t:
                return end
        progress_ms = round(max(0.0, pos - s.position_s) * 1000)  # a backwards jump: none
        return min(t, max(lo, t - progress_ms))

    def _close_stall(self, end: int, ended_by: str) -> None:
        s = self._stall
        assert s is not None
        self._advance(end)
        self._stall = None
        self.state = PLAYING if self._first_frame_t is not None else STARTING
        dur = end - s.start
        self._closed_buffer_ms += dur  # mirrors the client's counters, short stalls too
        if s.startup:
            return
        if dur < MIN_STALL_MS:
            self.short_stalls += 1
            self.playing_ms += dur
            if self._br is not None:
                self._br_ms += dur
                self._br_sum += self._br * dur
            return
        if s.after_seek:
            self.seek_rebuffer_count += 1
            self.seek_rebuffer_ms += dur
        else:
            self.rebuffer_count += 1
            self.rebuffer_ms += dur
        if len(self._records) >= MAX_BUFFERING_EVENTS:
            self.records_dropped += 1
            return
        self._records.append({
            "started_t_ms": s.start, "duration_ms": dur, "position_s": s.position_s,
            "bitrate_kbps": None if s.bitrate is None else round(s.bitrate / 1000, 1),
            "cdn_response_ms": s.cdn_ms, "after_seek": s.after_seek, "ended_by": ended_by,
        })

    def _stop_stall(self, t: int, ended_by: str) -> None:
        self._advance(t)
        if self._stall is not None:
            self._close_stall(t, ended_by)

    # -- event handlers (one per type; ``f`` is the validated field mapping) -----------

    def _on_session_start(self, t: int, f: Any) -> None:
        if not self._session_started:  # only the first one counts
            self._session_started = True
            self._ttfb, self._load = f.get("ttfb_ms"), f.get("load_time_ms")
            self._conn = f.get("connection_type")
        pos = self._position(f)
        if pos is not None and self._first_frame_t is None:
            self._start_pos = pos

    def _on_play(self, t: int, f: Any) -> None:
        self._stop_stall(t, "play")
        self._position(f)
        if self._first_frame_t is None:
            self._first_frame_t = t
        self.state = PLAYING

    def _on_pause(self, t: int, f: Any) -> None:
        self._stop_stall(t, "pause")
        self._position(f)
        self.state = PAUSED

    def _on_seek(self, t: int, f: Any) -> None:
        self._stop_stall(t, "seek")
        self._position(f, "from_position_seconds")  # the target is not "reached" yet
        self.seek_count += 1
        self._last_seek_t = t

    def _on_heartbeat(self, t: int, f: Any) -> None:
        pos = f["position_seconds"]
        if self._stall is not None and pos > self._stall.position_s + PROGRESS_S:
            self._close_stall(self._infer_end(t, pos, f), "heartbeat")
        self._advance(t)
        if self.state == STARTING and pos > self._start_pos + PROGRESS_S:
            self._first_frame_t, self.state = t, PLAYING  # late bound: no play event seen
        self._position(f)
        if f.get("current_bitrate") is not None:
            self._set_bitrate(f["current_bitrate"])
        self._resolution = f.get("resolution", self._resolution)
        self._counters(f)

    def _on_buffering_start(self, t: int, f: Any) -> None:
        pos = f["position_seconds"]
        if self._stall is not None:  # previous stall's end was lost
            self._close_stall(self._infer_end(t, pos, f), "buffering_start")
        self._advance(t)
        self._position(f)
        if self._br is None and f.get("bitrate_before") is not None:
            self._br = f["bitrate_before"]
        seek = self._last_seek_t is not None and t - self._last_seek_t <= SEEK_WINDOW_MS
        self._stall = _Stall(t, pos, f.get("bitrate_before", self._br),
                             f.get("cdn_response_time_ms"), seek, self._first_frame_t is None)
        self._stall_starts += 1
        self.state = BUFFERING

    def _on_buffering_end(self, t: int, f: Any) -> None:
        self._advance(t)
        self._position(f)
        if self._stall is not None:  # an end without a start is ignored
            if f.get("cdn_response_time_ms") is not None:
                self._stall.cdn_ms = f["cdn_response_time_ms"]
            self._close_stall(t, "buffering_end")

    def _on_quality_change(self, t: int, f: Any) -> None:
        self._advance(t)
        self._position(f)
        self._set_bitrate(f["bitrate"], f.get("previous_bitrate"))
        self._resolution = f.get("resolution", self._resolution)

    def _on_milestone(self, t: int, f: Any) -> None:
        self._advance(t)
        self._position(f)
        self._milestones.add(f["percent"])

    def _on_error(self, t: int, f: Any) -> None:
        self._advance(t)
        self._position(f)
        self.error_count += 1
        if not f.get("fatal", True):
            return
        self._stop_stall(t, "error")
        if self._fatal is None:
            self._fatal = (f["code"], f["message"])
        if self._first_frame_t is None:
            self.startup_failure = True
        else:
            self.playback_failure = True
        self.state = STOPPED

    def _on_session_end(self, t: int, f: Any) -> None:
        self._stop_stall(t, "session_end")
        self._position(f)
        self._counters(f)
        self._end(t, f["reason"])

    def _end(self, t: int, reason: str) -> None:
        self.state, self._end_t, self.end_reason = ENDED, t, reason

    # -- results ----------------------------------------------------------------------

    def finish(self, end_t_ms: int | None) -> None:
        """The exercise session ended. Close an open stall / playing interval at
        ``end_t_ms``, but no earlier than the last event and no later than
        :data:`FINISH_GRACE_MS` after it (a silent player is not watched for ever).
        Idempotent; a view already ended by ``session_end`` is left as is."""
        if self.state == ENDED:
            return
        last = self._hw if self._hw is not None else 0
        end = last if end_t_ms is None else max(last, min(end_t_ms, last + FINISH_GRACE_MS))
        if self.state != IDLE:
            self._stop_stall(end, "finish")
        self._end(end, "exercise_session_ended")

    def stalls(self) -> list[tuple[int, int]]:
        """(start, end) client ms of the recorded genuine (not seek-induced) stalls."""
        return [(r["started_t_ms"], r["started_t_ms"] + r["duration_ms"])
                for r in self._records if not r["after_seek"]]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable metrics (field list: ``docs/media-metrics.md``). Before
        :meth:`finish` it is a snapshot: an open stall is not yet counted."""
        watch, ended = self.watch_ms, self.state == ENDED
        started = self._first_frame_t is not None
        req = self._request_t
        pct = None
        if self.media_duration_s:
            pct = min(100.0, round(100 * self._max_pos / self.media_duration_s, 1))
        if self._milestones:
            pct = max(pct or 0.0, float(max(self._milestones)))
        return {
            "media_id": self.media_id, "view_id": self.view_id,
            "media_duration_s": self.media_duration_s,
            "started_t_ms": self._start_t, "ended_t_ms": self._end_t,
            "startup_time_ms": self._first_frame_t - req if started and req is not None
            else None,
            "ttfb_ms": self._ttfb, "load_time_ms": self._load, "connection_type": self._conn,
            "video_started": started,
            "exit_before_video_start": ended and not started and not self.startup_failure,
            "startup_failure": self.startup_failure, "playback_failure": self.playback_failure,
            "error_count": self.error_count,
            "error_code": self._fatal[0] if self._fatal else None,
            "error_message": self._fatal[1] if self._fatal else None,
            "watch_time_ms": watch, "playing_time_ms": self.playing_ms,
            "rebuffer_count": self.rebuffer_count, "rebuffer_ms": self.rebuffer_ms,
            "rebuffer_pct": round(100 * self.rebuffer_ms / watch, 2) if watch else None,
            "rebuffer_per_min": round(self.rebuffer_count * 60_000 / watch, 3) if watch
            else None,
            "seek_count": self.seek_count, "seek_rebuffer_count": self.seek_rebuffer_count,
            "seek_rebuffer_ms": self.seek_rebuffer_ms,
            "avg_bitrate_kbps": round(self._br_sum / self._br_ms / 1000, 1) if self._br_ms
            else None,
            "upswitches": self.upswitches, "downswitches": self.downswitches,
            "quality_changes": self.upswitches + self.downswitches,
            "resolution": self._resolution,
            "dropped_frames": self._dropped_base + self._dropped_last,
            "milestones": sorted(self._milestones),
            "completed": 95 in self._milestones or self.end_reason == "completed",
            "completion_pct": pct, "end_reason": self.end_reason,
            "client_buffering_count": self._client_buf[0] if self._client_buf else None,
            "client_buffering_ms": self._client_buf[1] if self._client_buf else None,
            "events_applied": self.applied, "events_duplicate": self.duplicates,
            "events_late": self.late, "events_after_end": self.after_end,
            "buffering_events": [dict(r) for r in self._records],
            "buffering_events_dropped": self.records_dropped,
        }
