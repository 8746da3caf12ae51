"""The browser client (``clients/web/``) in real headless Chromium against the real service.

The test page (``clients/web/test/``) is served from one loopback port, the service
(with the CORS wrapper) listens on another, so every request is a real cross-origin one.
The page feeds recorded MediaPipe landmarks (``tests/data/pose/pushup``) at 30 fps
through the client's API and plays a WebM video that ffmpeg made for the test; then we
check what the *service* computed: the session summary, the replay blob, the media view.

Needs Debian's chromium, chromium-driver and ffmpeg (see ``support.browser.APT_LINE``); a
missing one fails the test with that line. Each test is bounded (``trio.fail_after``).
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
import trio

from domain.pose_batch import encode_batch
from storage.bus import InProcessBus
from storage.replay import read_replay
from telemetry.config import Settings
from telemetry.wiring import open_blob_store
from tests.support.browser import WEB_CLIENT, Browser, require_browser_tools
from tests.support.media import Recording, load_recording, make_video
from tests.support.payloads import session_token
from tests.support.ports import free_port
from tests.support.processes import ServiceProcess
from tests.support.service import RequestLog, running_cors_service
from tests.support.static_files import static_server

VIDEO_S = 8.0
STALL_HOLD_S = 3.5
# Two real clips, 300 frames (10 s at 30 fps), 5 labelled push-ups, 3 no-pose frames.
CLIPS = ("correct108", "correct118")


@dataclasses.dataclass(frozen=True)
class Assets:
    origin: str
    recording: Recording


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Assets]:
    require_browser_tools()
    gen = tmp_path_factory.mktemp("web-assets")
    make_video(gen / "video.webm", seconds=VIDEO_S)
    recording = load_recording(CLIPS)
    (gen / "frames.json").write_text(recording.json())
    # /slow/video.webm is the same file from a "network" that, once a quarter of it is
    # out, sends nothing more for STALL_HOLD_S: a real stall, a second or two in.
    stall_at = (gen / "video.webm").stat().st_size // 4
    with static_server({"/": WEB_CLIENT, "/gen/": gen, "/slow/": gen},
                       stalls={"/slow/video.webm": (stall_at, STALL_HOLD_S)}) as origin:
        yield Assets(origin, recording)


@pytest.fixture
def browser(assets: Assets, tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def page_url(assets: Assets, *, api: str, token: str, session: str, **params: Any) -> str:
    query = {"api": api, "token": token, "session": session, "frames": "/gen/frames.json",
             "video": "/gen/video.webm"}
    query.update({k: str(v) for k, v in params.items()})
    return f"{assets.origin}/test/index.html?{urlencode(query)}"


def check_blob(blob: bytes, expected: np.ndarray) -> dict[str, Any]:
    """The replay holds exactly the frames the page produced, in order: the same no-pose
    rows, every value within the encoding's bound, timestamps strictly increasing."""
    replay = read_replay(blob)
    assert replay.frames.shape == expected.shape
    nan_rows = np.isnan(expected).all(axis=(1, 2))
    assert np.array_equal(np.isnan(replay.frames).all(axis=(1, 2)), nan_rows)
    bound = np.asarray(replay.header.max_error or [0.0] * 4, dtype=np.float32)
    err = np.abs(replay.frames[~nan_rows] - expected[~nan_rows])
    assert (err <= bound + 1e-7).all(), f"max error {err.max(axis=(0, 1))} > {bound}"
    dt = np.diff(replay.t_ms)
    assert (dt > 0).all()
    return {"frames": int(replay.frames.shape[0]), "mean_dt_ms": float(dt.mean()),
            "meta": replay.header.meta}


async def test_delivery_policy_in_chromium(assets: Assets, browser: Browser) -> None:
    """The client's retry, buffer and page-hide policy, driven through its transport seam
    by a scripted fake transport in real Chromium; and its bytes against the Python
    encoder the service's tests use."""
    with trio.fail_after(30):
        await browser.get(f"{assets.origin}/test/index.html?mode=modules")
        await browser.wait_page(lambda p: p["state"] == "ready", "the modules", timeout=10)
        out = await browser.js_async("""
            const done = arguments[arguments.length - 1];
            import('./policy.js').then((m) => m.run()).then(done,
                (e) => done({failure: String(e && e.stack || e)}));""")
    assert "failure" not in out, out.get("failure")

    retry = out["retry"]
    assert retry["drained"] and retry["errors"] == [] and retry["same"]
    # seq 0: 503 (Retry-After 1 s), network error, 202; seq 1: 429 (1 s), 500, 202
    assert retry["order"] == [0, 0, 0, 1, 1, 1]
    gaps = retry["gaps"]
    assert 1000 <= gaps[0] <= 1300 and gaps[1] <= 300  # Retry-After + <=10%; backoff <= cap
    assert 1000 <= gaps[3] <= 1300 and gaps[4] <= 300
    assert retry["stats"]["batchesAcked"] == 2 and retry["stats"]["retries"] == 4
    assert retry["stats"]["framesAcked"] == 60
    # the very bytes domain.pose_batch.encode_batch makes: frames at k*33 ms, < 1000 ms
    k = np.arange(31)
    t = (k * 33).astype(np.uint32)
    frames = np.empty((31, 33, 4), np.float32)
    frames[:, :, 0] = 0.3 + np.arange(33) / 100
    frames[:, :, 1] = (0.4 + k / 1000)[:, None]
    frames[:, :, 2], frames[:, :, 3] = -0.1, 0.9
    expected = encode_batch(0, t, frames, space="image", image_width=640, image_height=480)
    assert bytes.fromhex(retry["first"]) == expected

    final = out["final"]
    assert final["sent"] == [0, 1, 2, 3]  # nothing after session_ended
    assert final["errors"] == [["rejected", 0, "nan_values"], ["dropped", 1, "sequence_skipped"],
                               ["session_ended", None, "session_ended"]]
    st = final["stats"]
    assert st["batchesAcked"] == 1 and st["batchesRejected"] == 1 and st["batchesDropped"] == 1
    assert st["framesAdded"] == 150 and st["framesAcked"] + st["framesLost"] == 150

    over = out["overflow"]
    assert over["addMs"] < 200  # 150 frames added while nothing is acknowledged: no blocking
    assert over["mid"]["buffered"] == 3 and over["mid"]["batchesOverflowed"] == 2
    assert over["errors"] == [["buffer_overflow", 0], ["buffer_overflow", 1]]
    assert over["sent"] == [0, 2, 3, 4]  # the in-flight 0 was abandoned; 1 never sent
    assert over["stats"]["batchesAcked"] == 3 and over["stats"]["nextSeq"] == 5

    hide = out["hide"]
    # oldest first while they fit the browser's 64 KiB keepalive budget (three ~16 KB
    # batches), then whatever still fits (the 3-frame open batch); the rest is reported
    assert hide["kept"] == [0, 1, 2, 9] and hide["bytes"] <= 64 * 1024 - 1024
    lost = [seq for kind, seq in hide["errors"] if kind == "lost_on_page_hide"]
    assert lost == [3, 4, 5, 6, 7, 8] and hide["stats"]["nextSeq"] == 10
    assert hide["ends"] == [{"id": "s-1", "keepalive": True}]
    assert hide["summary"] == {"session_id": "s-1"}

    v = out["values"]
    assert v["none"] is None and v["partial"] is None  # sent as all-NaN frames
    assert v["clamped"][3] == 1.0
    assert v["tasks"][:2] == pytest.approx([0.3, 0.401]) and v["world"][1] == pytest.approx(0.402)

    check_stream_policy(out["stream"])


def check_stream_policy(out: dict[str, Any]) -> None:
    """The WebSocket transport against a scripted fake stream (clients/web/test/policy.js)."""
    def delivered(r: dict[str, Any], batches: int) -> None:
        assert r["drained"] and r["errors"] == []
        st = r["stats"]
        assert st["batchesSealed"] == st["batchesAcked"] == batches and st["framesLost"] == 0

    res = out["resend"]
    delivered(res, 10)
    assert res["url"] == "ws://svc.test/v1/pose/stream"
    assert res["protocols"] == ["restartix.pose.v1", "bearer.tok-1"]
    # 1012 with 2-5 unanswered (2 already durable): all resent, in order, first; the
    # resent durable one is a duplicate; never more than the window of 4 unanswered
    assert res["first"] == [0, 1, 2, 3, 4, 5] and res["second"] == list(range(2, 10))
    assert res["maxUnanswered"] == 4 and res["stats"]["batchesDuplicate"] == 1
    assert res["transport"]["closes"] == {"1012": 1} and res["transport"]["opens"] == 2
    assert res["transport"]["batchesResent"] == 4 and res["posts"] == 0 and res["reports"] == []

    tok = out["token"]
    delivered(tok, 5)
    assert tok["asks"] == 1 and tok["protocols"] == ["bearer.tok-1", "bearer.tok-2"]
    assert tok["second"] == [2, 3, 4] and tok["endAuth"] == ["Bearer tok-2"]
    assert tok["transport"]["closes"] == {"4401": 1} and tok["summary"] == {"session_id": "s-1"}

    ref = out["refusals"]
    assert ref["errors"] == [["rejected", 0, "nan_values"], ["dropped", 2, "sequence_skipped"],
                             ["session_ended", None, "session_ended"]]
    assert ref["received"] == [0, 1, 2, 3, 4, 1, 5]  # nothing after the end; 0, 2 not resent
    assert 1000 <= ref["retryGap"] <= 1300  # retry_after 1 s, plus up to 10 %
    assert ref["stats"]["batchesAcked"] == 3 and ref["stats"]["retries"] == 1
    assert ref["transport"]["mode"] == "ended" and ref["posts"] == 0

    fb = out["fallback"]
    delivered(fb, 10)
    # three sockets fail, batch 0 goes by POST (answered), a fourth socket fails: POST
    assert fb["sockets"] == 4 and fb["posts"] == list(range(10))
    assert fb["transport"]["mode"] == "fetch" and fb["transport"]["probes"] == 1
    assert [r["type"] for r in fb["reports"]] == ["stream_fallback"]
    assert fb["reports"][0]["reason"] == "websocket_unavailable"

    down = out["down"]
    delivered(down, 10)
    # neither the socket nor POST gets through for 600 ms: no fallback, and the socket
    # carries every batch once the service is back
    assert down["transport"]["mode"] == "socket" and down["transport"]["fallback"] is None
    assert down["transport"]["probes"] >= 1 and down["reports"] == []
    assert down["transport"]["acks"] + down["postedOk"] == 10

    silent = out["silent"]
    delivered(silent, 5)
    assert silent["closedBy"] == {"code": 4000, "reason": "no answer"}
    assert silent["second"] == [0, 1, 2, 3, 4] and silent["ms"] < 2000

    hide = out["hide"]
    assert hide["before"]["pending"] == 4 and hide["onSocket"] == [0, 1, 2, 3]
    assert hide["closedBy"] == {"code": 1000, "reason": "client done"}
    # unanswered batches by keepalive POST within the 64 KiB budget, then the end call
    assert hide["keepalive"] == [["/v1/pose/frames", 0], ["/v1/pose/frames", 1],
                                 ["/v1/pose/frames", 2], ["/v1/pose/frames", 4],
                                 ["/v1/sessions/s-1/end", None]]
    assert hide["errors"] == [["lost_on_page_hide", 3]] and hide["summary"] == {"session_id": "s-1"}
    assert hide["transport"]["mode"] == "closed" and hide["transport"]["pending"] == 0


async def test_pose_and_media_from_chromium(settings: Settings, assets: Assets,
                                            browser: Browser) -> None:
    """A whole session: 300 recorded frames at 30 fps and an 8 s video with a pause and a
    seek, then the page ends the session; the summary matches what the page produced."""
    with trio.fail_after(55):
        async with running_cors_service(settings, [assets.origin]) as svc:
            token = session_token(settings, org_id="org-a", session_id="web-1",
                                  exercise={"kind": "push_up"})
            await browser.get(page_url(assets, api=svc.url, token=token, session="web-1",
                                       mode="auto", pauseAt=2, pauseMs=1000, seekFrom=4,
                                       seekTo=6, heartbeatMs=2000, flushMs=2000))
            state = await browser.wait_page(lambda p: p["state"] == "done", "the session end",
                                            timeout=40)
            blob = await svc.storage.store.get("org-a/web-1.bin.gz")
            events = [e for e in svc.events if e.get("session_id") == "web-1"]
    res = state["result"]
    summary, client, tracker = res["summary"], res["client"], res["tracker"]
    rec = assets.recording
    print("client", client, "\ntracker", tracker, "\npose", summary["pose"],
          "\nreps", {k: v for k, v in (summary["reps"] or {}).items() if k != "reps"},
          "\nmedia", summary["media"])
    assert state["errors"] == []
    assert summary is not None and summary["end_reason"] == "client_end"
    assert len(events) == 1 and events[0]["pose"] == summary["pose"]

    # pose: every frame the page fed is in the summary and the blob, no batch lost
    pose = summary["pose"]
    assert res["fed"] == len(rec.frames) == 300
    assert pose["frames"] == 300 and pose["frames_no_pose"] == rec.no_pose == 3
    assert pose["batches"] == client["batchesSealed"] == client["batchesAcked"]
    assert pose["batches_skipped"] == 0 and pose["batches_duplicate"] == 0
    assert client["framesLost"] == 0 and client["buffered"] == 0
    assert 8 <= pose["batches"] <= 12  # about one batch per second of frames
    assert 28 <= pose["effective_fps"] <= 32
    # the page stamps each frame with its capture time (page.js), so a busy host that
    # delays the page's timers cannot bunch frames up and open gaps between them
    assert pose["gaps"] == 0
    blob_info = check_blob(blob, rec.frames)
    assert blob_info["meta"].get("image_width") == 640
    assert blob_info["meta"].get("image_height") == 480
    # the rep engine saw real push-ups at the right tempo: the labelled count
    assert summary["reps"]["rep_count"] == rec.reps == 5

    # media: one view, every event the tracker emitted applied once, metrics as scripted
    (view,) = summary["media"]
    assert view["view_id"] == tracker["viewId"] and view["media_id"] == "test-video-01"
    assert view["events_applied"] == tracker["eventsEmitted"] == tracker["eventsAcked"]
    assert view["events_duplicate"] == 0 and view["events_late"] == 0
    assert tracker["byType"]["session_start"] == 1 and tracker["byType"]["pause"] == 1
    assert tracker["byType"]["seek"] == 1 and tracker["byType"]["heartbeat"] >= 2
    assert view["media_duration_s"] == pytest.approx(VIDEO_S, abs=0.1)
    assert view["video_started"] and 0 <= view["startup_time_ms"] <= 3000
    assert view["milestones"] == [25, 50, 75, 95]
    assert view["completed"] and view["completion_pct"] == 100
    assert view["end_reason"] == "completed"
    assert view["seek_count"] == 1 and view["rebuffer_count"] == 0
    assert view["error_count"] == 0 and view["resolution"] == "320x240"
    # 0-4 s and 6-8 s of the video were played; the 1 s pause is not watch time
    assert 5500 <= view["playing_time_ms"] <= 7000
    span = view["ended_t_ms"] - view["started_t_ms"]
    assert 900 <= span - view["watch_time_ms"] <= 1500


async def test_pose_over_websocket_from_chromium(settings: Settings, assets: Assets,
                                                browser: Browser) -> None:
    """A whole session with `transport: 'websocket'`: every pose batch goes over one
    /v1/pose/stream socket (no pose POST at all), each acknowledged once durable; every
    frame the page fed is in the summary and the blob. Media events and the end call
    stay on POST."""
    log = RequestLog()
    with trio.fail_after(55):
        async with running_cors_service(settings, [assets.origin], log) as svc:
            token = session_token(settings, org_id="org-a", session_id="web-ws",
                                  exercise={"kind": "push_up"})
            await browser.get(page_url(assets, api=svc.url, token=token, session="web-ws",
                                       mode="auto", transport="websocket", heartbeatMs=2000,
                                       flushMs=2000))
            state = await browser.wait_page(lambda p: p["state"] == "done", "the session end",
                                            timeout=40)
            blob = await svc.storage.store.get("org-a/web-ws.bin.gz")
            events = [e for e in svc.events if e.get("session_id") == "web-ws"]
    res = state["result"]
    summary, client, tracker, transport = (res["summary"], res["client"], res["tracker"],
                                           res["transport"])
    rec = assets.recording
    print("client", client, "\ntransport", transport, "\npose", summary["pose"])
    assert state["errors"] == []
    assert summary is not None and summary["end_reason"] == "client_end"
    assert len(events) == 1 and events[0]["pose"] == summary["pose"]

    pose = summary["pose"]
    assert res["fed"] == len(rec.frames) == 300
    assert pose["frames"] == 300 and pose["frames_no_pose"] == rec.no_pose
    assert pose["batches"] == client["batchesSealed"] == client["batchesAcked"]
    assert pose["batches_skipped"] == 0 and pose["batches_duplicate"] == 0
    assert client["framesLost"] == 0 and client["buffered"] == 0
    check_blob(blob, rec.frames)
    assert pose["gaps"] == 0  # capture-time stamps (page.js): no bunching under load
    assert summary["reps"]["rep_count"] == rec.reps

    # over the socket: one socket, one ack per batch, nothing resent, nothing POSTed
    assert transport["fallback"] is None and transport["mode"] == "closed"
    assert transport["opens"] == 1 and transport["failedOpens"] == 0
    assert transport["acks"] == transport["batchesSent"] == client["batchesSealed"]
    assert transport["batchesResent"] == 0 and transport["postBatches"] == 0
    assert log.posts("/v1/pose/frames") == []
    # the media tracker and the end call went by POST, as before
    assert [r.status for r in log.posts("/v1/sessions/web-ws/end")] == [200]
    (view,) = summary["media"]
    assert view["events_applied"] == tracker["eventsEmitted"] == tracker["eventsAcked"]
    assert view["completed"]


async def test_websocket_token_refresh_in_chromium(settings: Settings, assets: Assets,
                                                   browser: Browser) -> None:
    """The session token expires a few seconds in: the service closes the stream with
    4401, the client asks `getToken` for a fresh one and reconnects with it, resending
    what was unanswered; every frame arrives and the end call uses the fresh token."""
    log = RequestLog()
    # The stream honours the clock leeway as the handshake does: keep it short here.
    settings = dataclasses.replace(settings, jwt_leeway_s=1.0)
    with trio.fail_after(55):
        async with running_cors_service(settings, [assets.origin], log) as svc:
            short = session_token(settings, org_id="org-a", session_id="web-ws-token",
                                  exercise={"kind": "push_up"}, ttl_s=6)
            fresh = session_token(settings, org_id="org-a", session_id="web-ws-token",
                                  exercise={"kind": "push_up"})
            await browser.get(page_url(assets, api=svc.url, token=short, session="web-ws-token",
                                       mode="auto", transport="websocket", token2=fresh))
            state = await browser.wait_page(lambda p: p["state"] == "done", "the session end",
                                            timeout=40)
            blob = await svc.storage.store.get("org-a/web-ws-token.bin.gz")
    res = state["result"]
    summary, client, transport = res["summary"], res["client"], res["transport"]
    print("client", client, "\ntransport", transport, "\npose", summary["pose"])
    assert state["errors"] == []
    assert transport["closes"].get("4401") == 1 and res["tokenAsks"] == 1
    assert transport["tokenRefreshes"] == 1 and transport["opens"] == 2
    assert transport["fallback"] is None and log.posts("/v1/pose/frames") == []
    assert summary["pose"]["frames"] == res["fed"] == 300
    assert summary["pose"]["batches"] == client["batchesSealed"] == client["batchesAcked"]
    assert summary["pose"]["batches_skipped"] == 0 and client["framesLost"] == 0
    check_blob(blob, assets.recording.frames)


async def test_video_stall_is_rebuffering(settings: Settings, assets: Assets,
                                          browser: Browser) -> None:
    """The video's data stops arriving mid-playback: Chromium fires `waiting` and later
    `playing`; the service counts one genuine stall (not startup, not seek) whose length
    is the one the page lived through, and the pose stream is untouched."""
    with trio.fail_after(55):
        async with running_cors_service(settings, [assets.origin]) as svc:
            token = session_token(settings, org_id="org-a", session_id="web-stall",
                                  exercise={"kind": "push_up"})
            await browser.get(page_url(assets, api=svc.url, token=token, session="web-stall",
                                       mode="auto", video="/slow/video.webm", flushMs=1000))
            state = await browser.wait_page(lambda p: p["state"] == "done", "the session end",
                                            timeout=40)
    res = state["result"]
    summary, tracker = res["summary"], res["tracker"]
    (view,) = summary["media"]
    print("tracker", tracker, "\nmedia", view)
    assert state["errors"] == []
    assert summary["pose"]["frames"] == res["fed"] == len(assets.recording.frames)
    assert view["events_applied"] == tracker["eventsEmitted"]
    assert view["rebuffer_count"] == 1 and view["seek_rebuffer_count"] == 0
    (stall,) = view["buffering"]
    assert not stall["after_seek"] and stall["ended_by"] == "buffering_end"
    assert 0.5 <= stall["position_s"] <= 4.0  # where the first quarter of the bytes ran out
    # the hold began when the page first asked for the file, so the stall is shorter
    assert 1000 <= view["rebuffer_ms"] == stall["duration_ms"] <= STALL_HOLD_S * 1000
    assert view["client_buffering_count"] == tracker["byType"]["buffering_start"]
    assert view["client_buffering_ms"] >= view["rebuffer_ms"]
    # the whole video played; watch time = startup + playing + the stall
    assert abs(view["playing_time_ms"] - VIDEO_S * 1000) <= 600
    assert abs(view["watch_time_ms"] - view["startup_time_ms"] - view["playing_time_ms"]
               - view["rebuffer_ms"]) <= 50
    assert view["rebuffer_pct"] == pytest.approx(
        100 * view["rebuffer_ms"] / view["watch_time_ms"], abs=0.01)
    assert view["completed"] and view["milestones"] == [25, 50, 75, 95]


async def test_page_hide_ends_the_session(settings: Settings, assets: Assets,
                                          browser: Browser) -> None:
    """Leaving the page mid-session: the `pagehide` handler hands the half-full last
    batch, the media view's last events and the end call to keepalive requests; the
    service ends the session (`client_end`, not the idle timeout) with every frame the
    page produced."""
    log = RequestLog()
    ended = trio.Event()

    async def on_event(event: Any) -> None:
        if event.get("session_id") == "web-hide":
            ended.set()

    with trio.fail_after(55):
        async with running_cors_service(settings, [assets.origin], log) as svc:
            assert isinstance(svc.storage.transport, InProcessBus)
            svc.storage.transport.subscribe(on_event)
            token = session_token(settings, org_id="org-a", session_id="web-hide",
                                  exercise={"kind": "push_up"})
            await browser.get(page_url(assets, api=svc.url, token=token, session="web-hide",
                                       mode="manual", heartbeatMs=1000, flushMs=1000))
            await browser.wait_page(
                lambda p: p["client"]["batchesAcked"] >= 2 and p["tracker"]["eventsAcked"] >= 3,
                "two acknowledged batches", timeout=20)
            # Stop the camera half-way through a batch, then leave the page.
            await browser.wait_page(lambda p: p["client"]["framesOpen"] >= 10,
                                    "a half-full batch", timeout=5)
            before = await browser.js("""
                const p = window.__page; p.stopFeeding = true;
                return {fed: p.fed, client: p.client.stats(), tracker: p.tracker.stats()};""")
            await browser.get("about:blank")
            with trio.fail_after(15):
                await ended.wait()
            (event,) = [e for e in svc.events if e.get("session_id") == "web-hide"]
            blob = await svc.storage.store.get("org-a/web-hide.bin.gz")
    fed, open_frames = before["fed"], before["client"]["framesOpen"]
    last_seq = before["client"]["nextSeq"]  # the batch sealed at page hide
    (end,) = log.posts("/v1/sessions/web-hide/end")
    hide = [r for r in log.posts("/v1/pose/frames") if r.seq == last_seq]
    media_hide = [r for r in log.posts("/v1/media/events") if b'"session_end"' in r.body]
    print("before page hide", before, "\npose", event["pose"], "\nmedia", event["media"],
          "\nat page hide (ms after the end call arrived):",
          [(r.path, r.seq, r.status, round((r.started - end.started) * 1000, 1))
           for r in [*hide, *media_hide, end]])
    assert event["end_reason"] == "client_end" and end.status == 200
    assert open_frames > 0 and len(hide) == 1 and len(media_hide) == 1
    assert hide[0].started < end.answered and media_hide[0].started < end.answered
    (view,) = event["media"]
    if hide[0].status == 202 and media_hide[0].status == 202:
        assert event["pose"]["frames"] == fed
        check_blob(blob, assets.recording.cycled(fed))
        assert view["end_reason"] == "user_exit"
        assert view["events_applied"] == before["tracker"]["eventsEmitted"] + 1  # session_end
    else:
        # Policy: what arrives after the end call is refused (409 session_ended). A
        # batch that arrived before it is taken even if the end call comes while it is
        # being spooled (the actor waits for admissions in flight), so a 409 here is
        # only allowed for a request that reached the service after the end call.
        for r in (hide[0], media_hide[0]):
            assert r.status == 202 or r.started > end.started, (r.path, r.status)
        assert {hide[0].status, media_hide[0].status} <= {202, 409}
        lost = open_frames if hide[0].status == 409 else 0
        assert event["pose"]["frames"] == fed - lost
        check_blob(blob, assets.recording.cycled(fed - lost))


def _retrying(p: dict[str, Any]) -> bool:
    """The page's client is trying to deliver: POSTs retried, or sockets that fail."""
    if p["transport"] is not None:
        return int(p["transport"]["failedOpens"]) >= 3
    return int(p["client"]["retries"]) >= 3


@pytest.mark.parametrize("transport", ["fetch", "websocket"])
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_server_restart_mid_session_loses_nothing(
    how: str, transport: str, assets: Assets, browser: Browser, tmp_path: Path,
) -> None:
    """`telemetry serve` (with CORS) as a child process is killed mid-session and started
    again on the same port and data directory while the page keeps streaming: the client
    buffers and retries the same batches; after the restart every frame is in the summary
    and the blob, and every media event was applied once. Over POST (one request per
    batch, retried) and over the WebSocket stream (reconnect, resend what was not
    acknowledged; SIGTERM closes it with 1012, SIGKILL just drops it)."""
    with trio.fail_after(58):
        page_origin = assets.origin
        svc = ServiceProcess(tmp_path / "data", free_port(), [page_origin], tmp_path / "svc.log")
        settings = svc.settings()
        session = f"web-{how}-{transport}"
        token = session_token(settings, org_id="org-a", session_id=session,
                              exercise={"kind": "push_up"})
        await svc.start()
        try:
            await browser.get(page_url(assets, api=svc.url, token=token, session=session,
                                       mode="manual", heartbeatMs=1000, flushMs=1000,
                                       retryBaseMs=200, retryCapMs=1000, transport=transport))
            await browser.wait_page(lambda p: p["client"]["batchesAcked"] >= 3,
                                    "three acknowledged batches", timeout=20)
            code = await svc.stop(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
            assert code == (-signal.SIGKILL if how == "sigkill" else 0), svc.log_tail()
            down = await browser.wait_page(
                lambda p: p["client"]["buffered"] >= 3 and _retrying(p),
                "batches buffered while the service is down", timeout=10)
            await svc.start()
            await browser.wait_page(
                lambda p: p["client"]["buffered"] == 0 and p["tracker"]["pending"] == 0,
                "the buffer drained after the restart", timeout=20)
            await browser.js("window.__page.finish()")
            state = await browser.wait_page(lambda p: p["state"] == "done", "the session end",
                                            timeout=15)
        finally:
            await svc.stop()
    store = open_blob_store(settings)
    try:
        blob = await store.get(f"org-a/{session}.bin.gz")
    finally:
        await store.aclose()
    res = state["result"]
    summary, client, tracker = res["summary"], res["client"], res["tracker"]
    print("while down", down["client"], down["transport"], "\nclient", client, "\ntracker",
          tracker, "\ntransport", res["transport"], "\npose", summary["pose"],
          "\nmedia", summary["media"])
    assert svc.starts == 2
    assert state["errors"] == []
    assert client["framesLost"] == 0 and client["batchesOverflowed"] == 0
    assert client["batchesAcked"] == client["batchesSealed"] == summary["pose"]["batches"]
    assert summary["pose"]["frames"] == res["fed"] == client["framesAdded"]
    assert summary["pose"]["batches_skipped"] == 0
    check_blob(blob, assets.recording.cycled(res["fed"]))
    (view,) = summary["media"]
    assert view["events_applied"] == tracker["eventsEmitted"] == tracker["eventsAcked"]
    assert tracker["retries"] >= 1 and tracker["eventsLost"] == 0
    if transport == "websocket":
        ws = res["transport"]
        # still streaming after the restart: no fallback to POST, a second socket opened
        # and carried batches; the stream's end was seen as the kill or the restart code
        assert ws["fallback"] is None and ws["opens"] >= 2
        assert ws["acks"] > down["transport"]["acks"]
        assert ws["closes"].get("1012" if how == "sigterm" else "1006", 0) >= 1
