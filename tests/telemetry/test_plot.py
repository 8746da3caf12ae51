"""``telemetry plot``: a session's replay blob drawn as a 1600x900 PNG.

The blobs are built the way the service builds them: a synthetic session with a known
number of repetitions, written with :class:`storage.replay.ReplayWriter`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from actors.replay_metrics import recompute
from storage.replay import ReplayWriter, read_replay
from telemetry.dev.plot import (
    HEIGHT_PX,
    ROM_COLOUR,
    WIDTH_PX,
    draw_session,
    plot_main,
    plot_session,
    stalls_from_media,
)
from telemetry.dev.synthetic import generate

STALLS: list[dict[str, Any]] = [{
    "media_id": "ex-squat-01", "view_id": "v-1",
    "buffering": [
        {"started_t_ms": 9000, "duration_ms": 2500, "after_seek": False},
        {"started_t_ms": 21000, "duration_ms": 1200, "after_seek": True},
    ],
}]


def make_blob(kind: str = "squat", *, reps: int = 6, seed: int = 7, side: str | None = None,
              space: str = "image", target: int | None = 6) -> bytes:
    """A finished session's blob, with the header meta the session actor writes."""
    s = generate(kind if kind in ("squat", "bicep_curl", "lateral_raise") else "lateral_raise",
                 reps=reps, seed=seed, space=space, aspect=16 / 9)
    w = ReplayWriter(org_id="org-a", session_id=f"s-{seed}", space=space, meta={
        "exercise": {"kind": kind, "side": side, "target_reps": target},
        "image_width": 1280, "image_height": 720,
    })
    w.append(s.t_ms, s.frames)
    return w.finish()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def rgb(path: Path) -> np.ndarray:
    return np.asarray(imread(path))[..., :3]


def assert_drawn(path: Path) -> np.ndarray:
    assert path.is_file()
    assert png_size(path) == (WIDTH_PX, HEIGHT_PX)
    pixels = rgb(path)
    assert pixels.shape == (HEIGHT_PX, WIDTH_PX, 3)
    # Not blank: a plot has a real spread of values and many colours.
    assert float(pixels.std()) > 0.05
    packed = np.round(pixels * 255).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1],
                                                                   dtype=np.uint32)
    assert np.unique(packed).size > 20
    return pixels


def test_plot_of_a_session(tmp_path: Path) -> None:
    out = tmp_path / "session.png"
    assert plot_session(make_blob(), out) == out
    assert_drawn(out)


def test_stalls_are_shaded_where_they_happened(tmp_path: Path) -> None:
    blob = make_blob()
    plain = assert_drawn(plot_session(blob, tmp_path / "plain.png"))
    shaded = assert_drawn(plot_session(blob, tmp_path / "stalls.png", media=STALLS))
    # Inside the angle panel (rows clear of title, legend and tracking strip), the two
    # images differ only in the columns of the two stalls: a few percent of the width.
    rows = slice(int(0.25 * HEIGHT_PX), int(0.65 * HEIGHT_PX))
    changed = (np.abs(plain[rows] - shaded[rows]).sum(axis=2) > 0.05).mean(axis=0)
    columns = np.flatnonzero(changed > 0.5)
    assert columns.size > 10, "no stall shading found"
    assert columns.size < 0.15 * WIDTH_PX, "the shading is not confined to the stalls"
    # Two separate shaded stretches, the first (2.5 s) wider than the second (1.2 s);
    # a range-of-motion bar drawn over a stall may cut a few columns out of its run.
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 8) + 1)
    assert len(runs) == 2
    assert runs[0].size > runs[1].size


@pytest.mark.parametrize(("kind", "side", "space"), [
    ("bicep_curl", "left", "image"),        # one side followed, the other dashed
    ("squat", None, "world"),               # world coordinates
    ("mystery move", None, "image"),        # unknown kind: the engine's fallback joint
])
def test_plot_variants(tmp_path: Path, kind: str, side: str | None, space: str) -> None:
    out = plot_session(make_blob(kind, side=side, space=space, target=None),
                       tmp_path / "v.png", media=STALLS)
    assert_drawn(out)


def test_plot_of_a_replay_without_frames(tmp_path: Path) -> None:
    empty = ReplayWriter(org_id="org-a", session_id="s-empty", space="image",
                         meta={"exercise": {"kind": "squat"}}).finish()
    out = plot_session(empty, tmp_path / "empty.png")
    assert png_size(out) == (WIDTH_PX, HEIGHT_PX)
    assert float(rgb(out).std()) > 0.01  # the title and the note, on white


def test_stalls_from_media_reads_event_and_actor_summaries() -> None:
    media = [
        {"buffering": [{"started_t_ms": 5000, "duration_ms": 700, "after_seek": False},
                       {"started_t_ms": 1000, "duration_ms": 300, "after_seek": True}]},
        {"buffering_events": [{"started_t_ms": 3000, "duration_ms": 100}]},
        {"buffering": [{"started_t_ms": "soon", "duration_ms": 5},      # not a number
                       {"started_t_ms": 10, "duration_ms": -1},          # negative
                       {"started_t_ms": 10}, "junk"]},
        "not a view",
    ]
    assert stalls_from_media(media) == [(1000.0, 1300.0, True), (3000.0, 3100.0, False),
                                        (5000.0, 5700.0, False)]
    assert stalls_from_media(None) == []


def test_plot_main_with_the_end_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "s-7.bin.gz"
    blob.write_bytes(make_blob())
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"type": "telemetry.session.ended", "org_id": "org-a",
                                 "session_id": "s-7", "media": STALLS}))
    out = tmp_path / "plots" / "s-7.png"  # the directory is created
    assert plot_main(blob, out, event) == 0
    assert_drawn(out)
    assert str(out) in capsys.readouterr().out


def test_plot_main_refuses_an_event_of_another_session(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "s-7.bin.gz"
    blob.write_bytes(make_blob())
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"org_id": "org-a", "session_id": "s-8", "media": []}))
    out = tmp_path / "x.png"
    assert plot_main(blob, out, event) == 1
    assert "session_id 's-8'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("blob_bytes", "event_text", "message"), [
    (b"not gzip at all", None, "not a valid replay blob"),
    (None, "{not json", "is not JSON"),
    (None, '"a string"', "neither an event"),
])
def test_plot_main_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     blob_bytes: bytes | None, event_text: str | None,
                                     message: str) -> None:
    blob = tmp_path / "b.bin.gz"
    blob.write_bytes(make_blob() if blob_bytes is None else blob_bytes)
    event = None
    if event_text is not None:
        event = tmp_path / "e.json"
        event.write_text(event_text)
    assert plot_main(blob, tmp_path / "x.png", event) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_main_missing_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot_main(tmp_path / "nope.bin.gz", tmp_path / "x.png", None) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "label"), [
    ("squat", "knee flexion (0° = leg straight)"),
    ("bicep_curl", "elbow flexion (0° = arm straight)"),
    ("lateral_raise", "shoulder abduction (0° = arm at side)"),
])
def test_angle_axis_in_the_clinical_convention(kind: str, label: str) -> None:
    """The axis names the clinical angle, the traces and bars are in it, and the
    bars are the rep records' own angle_min_deg/angle_max_deg."""
    replay = read_replay(make_blob(kind))
    fig = draw_session(replay)
    ax = fig.axes[0]
    assert ax.get_ylabel().startswith(label)
    traces = [ln for ln in ax.get_lines() if ln.get_label().startswith(("left ", "right "))]
    assert len(traces) == 2
    rest = np.nanmedian(np.concatenate([np.asarray(ln.get_ydata(), float) for ln in traces]))
    # most of a session is spent at rest: near 0°, not near 180° (the included angle)
    assert 0.0 <= rest < 35.0, rest
    reps = recompute(replay)["reps"]["reps"]
    assert reps
    bars = sorted((ln for ln in ax.get_lines()
                   if ln.get_color() == ROM_COLOUR and len(ln.get_ydata()) == 2),
                  key=lambda ln: float(ln.get_xdata()[0]))
    assert [tuple(map(float, ln.get_ydata())) for ln in bars] == [
        (r["angle_min_deg"], r["angle_max_deg"]) for r in reps]


def test_encoding_is_in_the_subtitle_not_the_title() -> None:
    fig = draw_session(read_replay(make_blob("squat")))
    title, subtitle = (t.get_text() for t in fig.texts[:2])
    assert title.startswith("Squat: ") and "encoding" not in title and "q16delta" not in title
    assert "encoding q16delta" in subtitle
    summary = recompute(read_replay(make_blob("squat")))["reps"]
    assert (f"knee flexion {summary['angle_min_deg']:.0f}–{summary['angle_max_deg']:.0f}°"
            in subtitle)
    # the subtitle fits the figure, however many figures it carries
    canvas = fig.canvas
    canvas.draw()
    extent = fig.texts[1].get_window_extent(renderer=canvas.get_renderer())  # type: ignore[attr-defined]
    assert extent.x1 <= 0.985 * fig.get_figwidth() * fig.dpi
