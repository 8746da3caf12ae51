"""Media view metrics: the documented worked example, dedupe, stalls, bitrate, pose side."""

from __future__ import annotations

import json
import math
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actors.media as media
from actors.media import MediaView
from actors.media_correlate import pose_during_stalls, sink_view
from actors.media_tracker import MediaTracker, MediaTrackerError
from domain.media_batch import MediaBatch, MediaEvent, decode_media_batch

# The worked example of docs/media-metrics.md, event for event (a 120 s exercise video).
WORKED: list[tuple[str, int, dict[str, Any]]] = [
    ("session_start", 1000, {"ttfb_ms": 180, "load_time_ms": 420, "connection_type": "wifi"}),
    ("play", 2000, {"position_seconds": 0.0}),
    ("quality_change", 2000, {"bitrate": 1_000_000, "resolution": "720p"}),
    ("heartbeat", 12000, {"position_seconds": 10.0, "buffering_count": 0,
                          "buffering_duration_ms": 0, "current_bitrate": 1_000_000,
                          "resolution": "720p", "dropped_frames": 2}),
    ("quality_change", 14000, {"bitrate": 3_000_000, "previous_bitrate": 1_000_000,
                               "resolution": "1080p", "position_seconds": 12.0}),
    ("buffering_start", 20000, {"position_seconds": 18.0, "bitrate_before": 3_000_000,
                                "cdn_response_time_ms": 900}),
    ("buffering_end", 22000, {"position_seconds": 18.0}),
    ("quality_change", 22000, {"bitrate": 1_000_000, "resolution": "720p"}),
    ("seek", 30000, {"position_seconds": 60.0, "from_position_seconds": 26.0}),
    ("buffering_start", 30500, {"position_seconds": 60.0}),
    ("buffering_end", 31500, {"position_seconds": 60.0}),
    ("milestone", 31500, {"percent": 25, "position_seconds": 60.0}),
    ("milestone", 31500, {"percent": 50, "position_seconds": 60.0}),
    ("heartbeat", 32000, {"position_seconds": 60.5, "buffering_count": 2,
                          "buffering_duration_ms": 3000, "current_bitrate": 1_000_000,
                          "dropped_frames": 5}),
    ("pause", 40000, {"position_seconds": 68.5}),
    ("play", 50000, {"position_seconds": 68.5}),
    ("heartbeat", 60000, {"position_seconds": 78.5, "buffering_count": 2,
                          "buffering_duration_ms": 3000, "current_bitrate": 1_000_000,
                          "dropped_frames": 5}),
    ("milestone", 71500, {"percent": 75, "position_seconds": 90.0}),
    ("buffering_start", 75000, {"position_seconds": 93.5, "bitrate_before": 1_000_000,
                                "cdn_response_time_ms": 2500}),
    # its buffering_end is lost; the heartbeats tell
    ("heartbeat", 80000, {"position_seconds": 93.5, "buffering_count": 3,
                          "buffering_duration_ms": 8000, "current_bitrate": 1_000_000,
                          "dropped_frames": 6}),
    ("heartbeat", 90000, {"position_seconds": 102.5, "buffering_count": 3,
                          "buffering_duration_ms": 9000, "current_bitrate": 1_000_000,
                          "dropped_frames": 6}),
    ("milestone", 101500, {"percent": 95, "position_seconds": 114.0}),
    ("session_end", 107500, {"reason": "completed", "position_seconds": 120.0,
                             "buffering_count": 3, "buffering_duration_ms": 9000,
                             "dropped_frames": 7}),
]


def wire(events: list[tuple[str, int, dict[str, Any]]], *, first_id: int = 0,
         view_id: str = "v-1", media_id: str = "ex-squat-01",
         duration: float | None = 120.0) -> bytes:
    evs = [{"id": f"e{first_id + i}", "type": t, "t_ms": ts, **f}
           for i, (t, ts, f) in enumerate(events)]
    return json.dumps({"media_id": media_id, "view_id": view_id, "media_duration_s": duration,
                       "events": evs}).encode()


def ev(event_id: str, etype: str, t: int, **fields: Any) -> MediaEvent:
    return MediaEvent(event_id, etype, t, MappingProxyType(fields))


def view_of(events: list[MediaEvent], duration: float | None = 120.0) -> MediaView:
    v = MediaView("m", "v", duration)
    for e in events:
        v.apply(e)
    return v


def test_worked_example_matches_the_hand_computation() -> None:
    tracker = MediaTracker()
    assert tracker.apply(decode_media_batch(wire(WORKED))) == (23, 0)
    tracker.finish(110_000)  # after session_end: changes nothing
    (s,) = tracker.summaries()
    # startup: play requested at 1000 (session_start), first frame at 2000
    assert (s["started_t_ms"], s["ended_t_ms"], s["startup_time_ms"]) == (1000, 107500, 1000)
    assert (s["ttfb_ms"], s["load_time_ms"], s["connection_type"]) == (180, 420, "wifi")
    assert s["video_started"] is True
    assert (s["exit_before_video_start"], s["startup_failure"], s["playback_failure"]) == (
        False, False, False)
    assert (s["error_count"], s["error_code"], s["error_message"]) == (0, None, None)
    # watch time: 1000 -> 107500 minus the 10 s pause (40000 -> 50000)
    assert s["watch_time_ms"] == 96_500
    # playing: watch - startup 1000 - stalls 2000 + 1000 + 6000
    assert s["playing_time_ms"] == 86_500
    # genuine stalls: 20000-22000 and 75000-81000 (end inferred from the heartbeat counters:
    # 9000 ms cumulative - 3000 ms already closed = 6000 ms)
    assert (s["rebuffer_count"], s["rebuffer_ms"]) == (2, 8000)
    assert s["rebuffer_pct"] == round(100 * 8000 / 96_500, 2) == 8.29
    assert s["rebuffer_per_min"] == round(2 / (96_500 / 60_000), 3) == 1.244
    # the stall 500 ms after the seek is counted apart
    assert (s["seek_count"], s["seek_rebuffer_count"], s["seek_rebuffer_ms"]) == (1, 1, 1000)
    # 6000 ms at 3 Mbit/s, 80 500 ms at 1 Mbit/s
    assert s["avg_bitrate_kbps"] == round((6000 * 3000 + 80_500 * 1000) / 86_500, 1) == 1138.7
    assert (s["upswitches"], s["downswitches"], s["quality_changes"]) == (1, 1, 2)
    assert (s["resolution"], s["dropped_frames"]) == ("720p", 7)
    assert s["milestones"] == [25, 50, 75, 95]
    assert (s["completed"], s["completion_pct"], s["end_reason"]) == (True, 100.0, "completed")
    assert (s["client_buffering_count"], s["client_buffering_ms"]) == (3, 9000)
    assert (s["events_applied"], s["events_duplicate"], s["events_late"],
            s["events_after_end"]) == (23, 0, 0, 0)
    assert s["buffering_events"] == [
        {"started_t_ms": 20000, "duration_ms": 2000, "position_s": 18.0, "bitrate_kbps": 3000.0,
         "cdn_response_ms": 900, "after_seek": False, "ended_by": "buffering_end"},
        {"started_t_ms": 30500, "duration_ms": 1000, "position_s": 60.0, "bitrate_kbps": 1000.0,
         "cdn_response_ms": None, "after_seek": True, "ended_by": "buffering_end"},
        {"started_t_ms": 75000, "duration_ms": 6000, "position_s": 93.5, "bitrate_kbps": 1000.0,
         "cdn_response_ms": 2500, "after_seek": False, "ended_by": "heartbeat"},
    ]
    assert s["buffering_events_dropped"] == 0
    assert tracker.stalls() == [(20000, 22000), (75000, 81000)]
    json.dumps(s, allow_nan=False)


def test_worked_example_pose_side() -> None:
    # a rep every 5 s (3 s long) from 5 s to 108 s; none at 75-83 s: the patient stopped
    reps = [{"start_ms": 5000 * k, "end_ms": 5000 * k + 3000} for k in range(1, 22)
            if k not in (15, 16)]
    got = pose_during_stalls([(20000, 22000), (75000, 81000)], reps, (0, 108_000))
    # 19 reps; one (20-23 s) overlaps the first stall; 18 reps in 100 s outside the stalls
    assert got == {
        "stall_count": 2, "stall_ms": 8000, "reps_during_stalls": 1,
        "rep_rate_per_min": 10.8,  # 18 / 100 s
        "stalls_paused": 1, "paused_during_stall": True,  # 75-81 s: 1.08 reps expected, 0 done
        "missed_reps_estimate": 1.08,  # max(0, 0.36 - 1) + max(0, 1.08 - 0)
        "method": "heuristic-v1",
    }


def test_redelivered_batches_are_applied_once() -> None:
    once = MediaTracker()
    once.apply(decode_media_batch(wire(WORKED)))
    again = MediaTracker()
    first, second = decode_media_batch(wire(WORKED[:10])), decode_media_batch(
        wire(WORKED[10:], first_id=10))
    assert again.apply(first) == (10, 0)
    assert again.apply(first) == (0, 10)  # retried after a lost response
    assert again.apply(second) == (13, 0)
    assert again.apply(first) == (0, 10)  # a very late retry
    assert again.apply(second) == (0, 13)
    a, b = once.summaries()[0], again.summaries()[0]
    assert b["events_duplicate"] == 33
    assert {k: v for k, v in a.items() if k != "events_duplicate"} == {
        k: v for k, v in b.items() if k != "events_duplicate"}


def test_events_after_the_end_are_acknowledged_but_change_nothing() -> None:
    t = MediaTracker()
    t.apply(decode_media_batch(wire(WORKED)))
    before = t.summaries()[0]
    late_play = decode_media_batch(wire([("play", 108_000, {"position_seconds": 0.0})],
                                        first_id=100))
    assert t.apply(late_play) == (1, 0)
    assert t.apply(late_play) == (0, 1)
    after = t.summaries()[0]
    assert (after["events_after_end"], after["events_duplicate"]) == (1, 1)
    ignore = {"events_after_end", "events_duplicate"}
    assert {k: v for k, v in after.items() if k not in ignore} == {
        k: v for k, v in before.items() if k not in ignore}


def test_late_events_with_new_ids_are_not_applied() -> None:
    v = view_of([ev("a", "play", 1000, position_seconds=0.0),
                 ev("b", "heartbeat", 11000, position_seconds=10.0, buffering_count=0,
                    buffering_duration_ms=0)])
    assert v.apply(ev("c", "pause", 5000, position_seconds=4.0)) is False
    assert v.apply(ev("d", "pause", 11000, position_seconds=10.0)) is True  # equal t is fine
    s = v.summary()
    assert (s["events_late"], s["events_applied"], s["watch_time_ms"]) == (1, 3, 10000)


def test_seen_ids_are_bounded_and_forgotten_ids_are_not_reapplied(monkeypatch) -> None:
    monkeypatch.setattr(media, "SEEN_IDS", 8)
    v = MediaView("m", "v", None)
    evs = [ev(f"e{i}", "heartbeat", 1000 * i, position_seconds=float(i), buffering_count=0,
              buffering_duration_ms=0) for i in range(20)]
    assert all(v.apply(e) for e in evs)
    assert len(v._ids) == 8 and len(v._id_order) == 8
    assert v.apply(evs[3]) is False  # forgotten id, but older than the high-water mark
    assert v.apply(evs[19]) is False  # remembered id
    # a genuinely new event at the time of a forgotten id is refused too (documented)
    w = MediaView("m", "v", None)
    same_t = [ev(f"s{i}", "milestone", 500, percent=25) for i in range(9)]
    assert all(w.apply(e) for e in same_t)  # the 9th evicts s0, remembered at t=500
    assert w.apply(same_t[0]) is False and w.apply(ev("new", "milestone", 500, percent=50)) is False
    assert w.apply(ev("later", "milestone", 501, percent=50)) is True
    assert (w.summary()["events_late"], w.summary()["events_duplicate"]) == (2, 0)


@pytest.mark.parametrize(("gap_ms", "after_seek"), [(0, True), (2000, True), (2001, False)])
def test_stall_within_two_seconds_of_a_seek_is_seek_induced(gap_ms: int, after_seek: bool
                                                           ) -> None:
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "seek", 5000, position_seconds=50.0, from_position_seconds=5.0),
                 ev("3", "buffering_start", 5000 + gap_ms, position_seconds=50.0),
                 ev("4", "buffering_end", 6500 + gap_ms, position_seconds=50.0)])
    s = v.summary()
    assert s["buffering_events"][0]["after_seek"] is after_seek
    genuine = (0, 0) if after_seek else (1, 1500)
    assert (s["rebuffer_count"], s["rebuffer_ms"]) == genuine
    assert (s["seek_rebuffer_count"], s["seek_rebuffer_ms"]) == ((1, 1500) if after_seek
                                                                 else (0, 0))
    assert v.stalls() == ([] if after_seek else [(5000 + gap_ms, 6500 + gap_ms)])
    assert s["watch_time_ms"] == 6500 + gap_ms  # seek stalls are still watch time


def test_bitrate_is_weighted_by_playing_time_only() -> None:
    v = view_of([
        ev("1", "session_start", 0),
        ev("2", "quality_change", 500, bitrate=8e6),  # startup at 8 Mbit/s: not weighted
        ev("3", "play", 1000, position_seconds=0.0),
        ev("4", "quality_change", 1000, bitrate=1e6),  # downswitch
        ev("5", "buffering_start", 11000, position_seconds=10.0),  # 10 s at 1 Mbit/s
        ev("6", "buffering_end", 41000, position_seconds=10.0),  # 30 s stall: not weighted
        ev("7", "quality_change", 41000, bitrate=3e6, previous_bitrate=1e6),  # up
        ev("8", "pause", 71000, position_seconds=40.0),  # 30 s at 3 Mbit/s
        ev("9", "quality_change", 72000, bitrate=2e6),  # while paused: down
        ev("10", "session_end", 500_000, reason="user_exit"),  # long pause: not weighted
    ])
    s = v.summary()
    assert s["avg_bitrate_kbps"] == (10 * 1000 + 30 * 3000) / 40 == 2500.0
    assert (s["upswitches"], s["downswitches"]) == (1, 2)
    assert (s["playing_time_ms"], s["watch_time_ms"]) == (40_000, 71_000)


def test_heartbeat_bitrate_change_counts_as_a_switch() -> None:
    hb = {"buffering_count": 0, "buffering_duration_ms": 0}
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "heartbeat", 10000, position_seconds=10.0, current_bitrate=2e6, **hb),
                 ev("3", "heartbeat", 20000, position_seconds=20.0, current_bitrate=1e6, **hb)])
    s = v.summary()
    # the first 10 s had no known bitrate; the next 10 s are attributed to 2 Mbit/s
    assert (s["avg_bitrate_kbps"], s["downswitches"], s["upswitches"]) == (2000.0, 1, 0)


def test_lost_buffering_end_position_fallback_when_counters_disagree() -> None:
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "buffering_start", 10000, position_seconds=10.0),
                 # the client counts 5 stalls (we saw 1): its counters are not used
                 ev("3", "heartbeat", 20000, position_seconds=14.0, buffering_count=5,
                    buffering_duration_ms=99_000)])
    s = v.summary()
    # 4 s of progress at 1x before t=20000: the stall ended at 16000
    assert s["buffering_events"][0]["duration_ms"] == 6000
    assert s["buffering_events"][0]["ended_by"] == "heartbeat"
    assert v.state == "playing" and v.stalls() == [(10000, 16000)]


def test_lost_buffering_end_before_the_next_stall() -> None:
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "buffering_start", 10000, position_seconds=10.0),
                 ev("3", "buffering_start", 30000, position_seconds=25.0)])
    assert v.stalls() == [(10000, 15000)]  # 15 s of progress before 30000
    v.finish(32000)
    assert v.stalls() == [(10000, 15000), (30000, 32000)]
    assert v.summary()["buffering_events"][1]["ended_by"] == "finish"


def test_inferred_end_is_never_after_the_event_that_reveals_it() -> None:
    # the playhead jumped back (a seek the client did not report): no progress at 1x
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "buffering_start", 10000, position_seconds=50.0),
                 ev("3", "buffering_start", 12000, position_seconds=5.0)])
    assert v.stalls() == [(10000, 12000)]


def test_inferred_end_is_never_before_an_event_seen_during_the_stall() -> None:
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "buffering_start", 10000, position_seconds=10.0),
                 ev("3", "heartbeat", 18000, position_seconds=10.0, buffering_count=1,
                    buffering_duration_ms=8000),
                 # progress of 10 s at 20000 would put the end at 10000; clamp to 18000
                 ev("4", "heartbeat", 20000, position_seconds=20.0, buffering_count=9,
                    buffering_duration_ms=0)])
    assert v.stalls() == [(10000, 18000)]


@pytest.mark.parametrize("closer", ["pause", "seek", "play"])
def test_pause_seek_or_play_ends_an_open_stall(closer: str) -> None:
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "buffering_start", 10000, position_seconds=10.0),
                 ev("3", closer, 13000, position_seconds=10.0)])
    assert v.summary()["buffering_events"][0]["ended_by"] == closer
    assert (v.summary()["rebuffer_ms"], v.stalls()) == (3000, [(10000, 13000)])


def test_finish_closes_an_open_stall_within_the_grace_period() -> None:
    v = view_of([ev("1", "session_start", 0), ev("2", "play", 500, position_seconds=0.0),
                 ev("3", "buffering_start", 10000, position_seconds=9.5)])
    v.finish(600_000)  # the pose stream went on for minutes; the player went silent
    s = v.summary()
    assert v.stalls() == [(10000, 10000 + media.FINISH_GRACE_MS)]
    assert (s["end_reason"], s["ended_t_ms"]) == ("exercise_session_ended", 25000)
    assert s["watch_time_ms"] == 25000
    v.finish(900_000)  # idempotent
    assert v.summary() == s
    assert v.apply(ev("4", "play", 700_000, position_seconds=9.5)) is True
    assert v.summary()["events_after_end"] == 1 and v.summary()["watch_time_ms"] == 25000


def test_finish_without_time_uses_the_last_event() -> None:
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "heartbeat", 9000, position_seconds=9.0, buffering_count=0,
                    buffering_duration_ms=0)])
    v.finish(None)
    assert (v.summary()["watch_time_ms"], v.summary()["ended_t_ms"]) == (9000, 9000)
    w = view_of([ev("1", "play", 5000, position_seconds=0.0)])
    w.finish(1000)  # an end before the last event is moved to it
    assert w.summary()["ended_t_ms"] == 5000


def test_exit_before_video_start() -> None:
    v = view_of([ev("1", "session_start", 0, ttfb_ms=2500),
                 ev("2", "buffering_start", 100, position_seconds=0.0),
                 ev("3", "session_end", 9000, reason="user_exit")])
    s = v.summary()
    assert (s["exit_before_video_start"], s["video_started"], s["startup_time_ms"]) == (
        True, False, None)
    assert (s["startup_failure"], s["playback_failure"]) == (False, False)
    assert (s["rebuffer_count"], s["buffering_events"]) == (0, [])  # startup, not rebuffering
    assert s["watch_time_ms"] == 9000
    open_view = view_of([ev("1", "session_start", 0)])
    assert open_view.summary()["exit_before_video_start"] is False  # not ended yet
    open_view.finish(None)
    assert open_view.summary()["exit_before_video_start"] is True


def test_startup_failure_and_playback_failure() -> None:
    err = {"code": "MEDIA_ERR_NETWORK", "message": "manifest 404"}
    before = view_of([ev("1", "session_start", 0), ev("2", "error", 3000, **err),
                      ev("3", "session_end", 4000, reason="error")]).summary()
    assert (before["startup_failure"], before["playback_failure"],
            before["exit_before_video_start"]) == (True, False, False)
    assert (before["error_code"], before["error_message"]) == ("MEDIA_ERR_NETWORK",
                                                               "manifest 404")
    assert before["watch_time_ms"] == 3000  # no watch time after the fatal error
    after = view_of([ev("1", "session_start", 0), ev("2", "play", 1000, position_seconds=0.0),
                     ev("3", "buffering_start", 5000, position_seconds=4.0),
                     ev("4", "error", 8000, **err)]).summary()
    assert (after["startup_failure"], after["playback_failure"]) == (False, True)
    assert after["buffering_events"][0]["ended_by"] == "error"
    nonfatal = view_of([ev("1", "play", 0, position_seconds=0.0),
                        ev("2", "error", 1000, fatal=False, **err)]).summary()
    assert (nonfatal["error_count"], nonfatal["playback_failure"], nonfatal["error_code"]) == (
        1, False, None)


def test_first_frame_from_heartbeat_progress_when_play_is_missing() -> None:
    v = view_of([ev("1", "session_start", 0, position_seconds=30.0),
                 ev("2", "heartbeat", 10000, position_seconds=30.2, buffering_count=0,
                    buffering_duration_ms=0),
                 ev("3", "heartbeat", 20000, position_seconds=39.0, buffering_count=0,
                    buffering_duration_ms=0)])
    s = v.summary()
    assert (s["video_started"], s["startup_time_ms"]) == (True, 20000)  # a late bound
    assert v.apply(ev("4", "session_start", 21000, ttfb_ms=5.0)) is True
    assert v.summary()["ttfb_ms"] is None  # only the first session_start counts
    no_start = view_of([ev("1", "play", 4000, position_seconds=0.0)]).summary()
    assert (no_start["video_started"], no_start["startup_time_ms"]) == (True, None)


def test_buffering_records_are_capped_but_metrics_still_count(monkeypatch) -> None:
    monkeypatch.setattr(media, "MAX_BUFFERING_EVENTS", 3)
    events = [ev("p", "play", 0, position_seconds=0.0)]
    for i in range(5):
        events += [ev(f"s{i}", "buffering_start", 10000 * (i + 1), position_seconds=float(i)),
                   ev(f"e{i}", "buffering_end", 10000 * (i + 1) + 100, position_seconds=float(i))]
    s = view_of(events).summary()
    assert (s["rebuffer_count"], s["rebuffer_ms"]) == (5, 500)
    assert (len(s["buffering_events"]), s["buffering_events_dropped"]) == (3, 2)


def test_dropped_frames_survive_a_counter_reset_and_completion_without_duration() -> None:
    hb = {"buffering_count": 0, "buffering_duration_ms": 0}
    v = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "heartbeat", 10000, position_seconds=10.0, dropped_frames=40, **hb),
                 ev("3", "heartbeat", 20000, position_seconds=20.0, dropped_frames=3, **hb),
                 ev("4", "milestone", 21000, percent=50)], duration=None)
    s = v.summary()
    assert s["dropped_frames"] == 43
    assert (s["completion_pct"], s["completed"]) == (50.0, False)
    assert view_of([ev("1", "play", 0, position_seconds=0.0)], None).summary()[
        "completion_pct"] is None


def test_buffering_end_without_start_is_ignored() -> None:
    s = view_of([ev("1", "play", 0, position_seconds=0.0),
                 ev("2", "buffering_end", 5000, position_seconds=5.0)]).summary()
    assert (s["rebuffer_count"], s["watch_time_ms"]) == (0, 5000)


def test_stalls_under_100_ms_are_not_rebuffering() -> None:
    """What Chromium sends on a busy CPU (`waiting`, `playing` a few ms later, the data
    already buffered) is not a rebuffer; from MIN_STALL_MS on it is, seek-induced too."""
    assert media.MIN_STALL_MS == 100
    v = view_of([ev("1", "session_start", 0),
                 ev("2", "buffering_start", 10, position_seconds=0.0),  # startup, 5 ms
                 ev("3", "play", 15, position_seconds=0.0),
                 ev("4", "buffering_start", 5000, position_seconds=5.0, bitrate_before=1e6),
                 ev("5", "buffering_end", 5014, position_seconds=5.0),  # 14 ms: a blip
                 ev("6", "buffering_start", 6000, position_seconds=6.0),
                 ev("7", "play", 6000, position_seconds=6.0),  # 0 ms, ended by `playing`
                 ev("8", "seek", 8000, position_seconds=20.0, from_position_seconds=8.0),
                 ev("9", "buffering_start", 8100, position_seconds=20.0),
                 ev("10", "buffering_end", 8199, position_seconds=20.0),  # 99 ms after seek
                 ev("11", "buffering_start", 9000, position_seconds=20.9),
                 ev("12", "buffering_end", 9100, position_seconds=20.9),  # 100 ms: counts
                 ev("13", "buffering_start", 12000, position_seconds=23.9),
                 ev("14", "buffering_end", 12100, position_seconds=23.9),  # 100 ms: counts
                 ev("15", "session_end", 20000, reason="user_exit", buffering_count=6,
                    buffering_duration_ms=318)])
    s = v.summary()
    assert v.short_stalls == 3
    assert (s["rebuffer_count"], s["rebuffer_ms"]) == (1, 100)
    assert (s["seek_rebuffer_count"], s["seek_rebuffer_ms"]) == (1, 100)
    assert [(b["started_t_ms"], b["after_seek"]) for b in s["buffering_events"]] == [
        (9000, True), (12000, False)]
    assert v.stalls() == [(12000, 12100)]
    # the blips' time is playing time; watch = startup + playing + both kinds of stall
    assert s["startup_time_ms"] == 15 and s["watch_time_ms"] == 20000
    assert s["playing_time_ms"] == 20000 - 15 - 100 - 100
    assert (s["client_buffering_count"], s["client_buffering_ms"]) == (6, 318)
    # the blip's time at a known bitrate weighs in the average bitrate like playing time
    assert s["avg_bitrate_kbps"] == 1000.0


def _batch(view_id: str, media_id: str, events: list[MediaEvent],
           duration: float | None = None) -> MediaBatch:
    return MediaBatch(media_id, view_id, duration, tuple(events))


def test_tracker_caps_views_and_refuses_conflicts_without_applying() -> None:
    t = MediaTracker(max_views=2)
    t.apply(_batch("a", "m1", [ev("1", "play", 0, position_seconds=0.0)]))
    t.apply(_batch("b", "m2", [ev("1", "play", 0, position_seconds=0.0)], duration=60.0))
    with pytest.raises(MediaTrackerError) as info:
        t.apply(_batch("c", "m3", [ev("1", "play", 0, position_seconds=0.0)]))
    assert info.value.code == "too_many_views" and isinstance(info.value, ValueError)
    with pytest.raises(MediaTrackerError) as info:
        t.apply(_batch("a", "m9", [ev("2", "pause", 10, position_seconds=0.0)]))
    assert info.value.code == "view_media_mismatch"
    assert [s["view_id"] for s in t.summaries()] == ["a", "b"]
    assert t.summaries()[0]["events_applied"] == 1  # nothing of the refused batch applied
    t.apply(_batch("a", "m1", [ev("3", "pause", 10, position_seconds=0.0)], duration=90.0))
    assert t.summaries()[0]["media_duration_s"] == 90.0  # learnt on a later batch
    t.finish(None)
    with pytest.raises(MediaTrackerError) as info:
        t.apply(_batch("a", "m1", [ev("4", "play", 20, position_seconds=0.0)]))
    assert info.value.code == "finished"


def test_tracker_stalls_are_merged_across_views() -> None:
    t = MediaTracker()
    for vid, (a, b) in (("v1", (1000, 5000)), ("v2", (4000, 9000)), ("v3", (20000, 21000))):
        t.apply(_batch(vid, "m", [ev("p", "play", 0, position_seconds=0.0),
                                  ev("s", "buffering_start", a, position_seconds=1.0),
                                  ev("e", "buffering_end", b, position_seconds=1.0)]))
    assert t.stalls() == [(1000, 9000), (20000, 21000)]


def test_pose_heuristics_edge_cases() -> None:
    reps = [{"start_ms": 5000 * k, "end_ms": 5000 * k + 3000} for k in range(1, 11)]
    # a 1 s stall in a rest gap: no rep expected in it, so not a pause
    short = pose_during_stalls([(9000, 10000 - 1)], reps)
    assert (short["stalls_paused"], short["reps_during_stalls"]) == (0, 0)
    assert short["missed_reps_estimate"] < 1
    # nothing to say without reps or stalls
    none = pose_during_stalls([(0, 5000)], [])
    assert (none["stall_count"], none["missed_reps_estimate"], none["paused_during_stall"]) == (
        0, None, False)
    assert pose_during_stalls([], reps)["stall_count"] == 0
    # stalls are clipped to the pose span; no reps after the stall: not called a pause
    tail = pose_during_stalls([(50000, 90000)], reps, (0, 60000))
    assert (tail["stall_ms"], tail["stalls_paused"]) == (10000, 0)
    # two identical reps are two reps; an inverted rep is a point
    dup = pose_during_stalls([(1000, 2000)], [{"start_ms": 1500, "end_ms": 1400}] * 2,
                             (0, 10000))
    assert dup["reps_during_stalls"] == 2


def test_sink_view_has_the_sink_shape() -> None:
    t = MediaTracker()
    t.apply(decode_media_batch(wire(WORKED)))
    out = sink_view(t.summaries()[0], t0_wall=1_700_000_000.0)
    assert "buffering_events" not in out
    assert out["started_at"] == "2023-11-14T22:13:21.000Z"
    assert out["ended_at"] == "2023-11-14T22:15:07.500Z"
    assert [b["started_at"] for b in out["buffering"]] == [
        "2023-11-14T22:13:40.000Z", "2023-11-14T22:13:50.500Z", "2023-11-14T22:14:35.000Z"]
    for key in ("startup_time_ms", "watch_time_ms", "rebuffer_ms", "rebuffer_pct",
                "avg_bitrate_kbps", "completion_pct", "rebuffer_count", "quality_changes",
                "seek_count", "error_count", "completed", "view_id", "media_id"):
        assert key in out
    json.dumps(out, allow_nan=False)


# -- property: any event sequence, in any batching with redelivery ----------------------

_pos = st.floats(0, 120, allow_nan=False)
_fields = {
    "session_start": st.fixed_dictionaries({}, optional={"ttfb_ms": st.floats(0, 5000)}),
    "play": st.fixed_dictionaries({"position_seconds": _pos}),
    "pause": st.fixed_dictionaries({"position_seconds": _pos}),
    "seek": st.fixed_dictionaries({"position_seconds": _pos}),
    "heartbeat": st.fixed_dictionaries(
        {"position_seconds": _pos, "buffering_count": st.integers(0, 5),
         "buffering_duration_ms": st.floats(0, 50_000)},
        optional={"current_bitrate": st.floats(0, 1e7), "dropped_frames": st.integers(0, 99)}),
    "buffering_start": st.fixed_dictionaries({"position_seconds": _pos},
                                             optional={"bitrate_before": st.floats(0, 1e7)}),
    "buffering_end": st.fixed_dictionaries({"position_seconds": _pos}),
    "quality_change": st.fixed_dictionaries({"bitrate": st.floats(0, 1e7)}),
    "milestone": st.fixed_dictionaries({"percent": st.sampled_from([25, 50, 75, 95])}),
    "error": st.fixed_dictionaries({"code": st.just("E"), "message": st.just("m")},
                                   optional={"fatal": st.booleans()}),
    "session_end": st.fixed_dictionaries({"reason": st.just("user_exit")}),
}
_step = st.sampled_from(sorted(_fields)).flatmap(
    lambda t: st.tuples(st.just(t), st.integers(0, 5000), _fields[t]))


@settings(max_examples=150, deadline=None)
@given(st.lists(_step, min_size=1, max_size=40), st.data())
def test_any_sequence_is_consistent_and_redelivery_safe(steps, data) -> None:
    events, t = [], 0
    for i, (etype, dt, fields) in enumerate(steps):
        t += dt
        events.append(ev(f"e{i}", etype, t, **fields))
    single = MediaTracker()
    single.apply(_batch("v", "m", events))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(events) - 1)), max_size=5)))
    chunks = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True) if b > a]
    split = MediaTracker()
    redelivered = 0
    for i, chunk in enumerate(chunks):
        assert split.apply(_batch("v", "m", chunk)) == (len(chunk), 0)
        j = data.draw(st.integers(0, i))
        # a redelivered earlier (or the same) batch: nothing applied
        assert split.apply(_batch("v", "m", chunks[j])) == (0, len(chunks[j]))
        redelivered += len(chunks[j])
    end = data.draw(st.none() | st.integers(0, t + 60_000))
    single.finish(end)
    split.finish(end)
    a, b = single.summaries()[0], split.summaries()[0]
    assert {k: v for k, v in a.items() if k != "events_duplicate"} == {
        k: v for k, v in b.items() if k != "events_duplicate"}
    assert (a["events_duplicate"], b["events_duplicate"]) == (0, redelivered)
    s = a
    json.dumps(s, allow_nan=False)
    assert s["watch_time_ms"] >= s["playing_time_ms"] + s["rebuffer_ms"] + s["seek_rebuffer_ms"]
    assert s["rebuffer_pct"] is None or 0 <= s["rebuffer_pct"] <= 100
    assert all(r["duration_ms"] >= 0 for r in s["buffering_events"])
    assert s["avg_bitrate_kbps"] is None or math.isfinite(s["avg_bitrate_kbps"])
    assert s["end_reason"] is not None and s["ended_t_ms"] is not None
    assert not (s["startup_failure"] and s["exit_before_video_start"])
    assert single.stalls() == sorted(single.stalls())
