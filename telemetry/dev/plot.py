"""Session plots: what a support engineer needs to see of one finished session.

:func:`plot_session` draws a replay blob as a 1600x900 PNG:

* the tracked joint angle over time, left and right, computed with the rep engine's
  own angle code (:mod:`actors.reps.angles`) for the exercise profile's joint and
  shown as clinicians read it (:mod:`actors.reps.clinical`: knee flexion 0° with the
  leg straight, shoulder abduction 0° with the arm at the side, ...), solid where the
  landmarks were visible enough for the engine, faint where they were not;
* every repetition the engine detects (recomputed from the blob, so the same as the
  live session's): a shaded span, a bar from its smallest to its largest angle
  (``angle_min_deg``/``angle_max_deg`` of the rep record), its number and range of
  motion;
* tracking quality along the bottom: mean landmark visibility per frame, frames with
  no pose, stretches with no frames at all;
* video stalls, shaded across both panels, when the session's media summaries are
  given (the end-of-session event's ``media`` list; docs/events.md).

Matplotlib is used through its object API with the Agg canvas: no pyplot, no global
backend state, nothing that needs a display. :func:`plot_main` is the command-line
entry point (``telemetry plot BLOB -o FILE.png [--event EVENT.json]``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from actors.replay_metrics import recompute
from storage.replay import Replay, ReplayFormatError, read_replay
from telemetry.dev.plot_figure import (
    HEIGHT_PX,
    ROM_COLOUR,
    WIDTH_PX,
    Figure,
    draw_figure,
    is_number,
    save_png,
)

__all__ = ["HEIGHT_PX", "ROM_COLOUR", "WIDTH_PX", "draw_session", "plot_main", "plot_session",
           "stalls_from_media"]


def stalls_from_media(media: Sequence[Mapping[str, Any]] | None) -> list[tuple[float, float, bool]]:
    """Video stalls as ``(start_ms, end_ms, after_seek)`` on the session's client clock.

    Each media view of the end-of-session event carries its stalls in ``buffering``
    (``buffering_events`` in the actor's own view summary; both are read). A stall
    needs ``started_t_ms`` and ``duration_ms``; entries without them (or with
    non-numeric values) are ignored rather than guessed."""
    out: list[tuple[float, float, bool]] = []
    for view in media or ():
        if not isinstance(view, Mapping):
            continue
        records = view.get("buffering")
        if records is None:
            records = view.get("buffering_events")
        for rec in records or ():
            if not isinstance(rec, Mapping):
                continue
            start, dur = rec.get("started_t_ms"), rec.get("duration_ms")
            if not (is_number(start) and is_number(dur)) or dur < 0:
                continue
            out.append((float(start), float(start) + float(dur), bool(rec.get("after_seek"))))
    return sorted(out)


def plot_session(blob: bytes, out: Path, *, media: list[dict] | None = None) -> Path:
    """Draw the session in replay ``blob`` as a PNG at ``out`` (1600x900) and return ``out``.

    ``media`` is the end-of-session event's ``media`` list; its views' stalls are
    shaded when given. Raises :class:`storage.replay.ReplayFormatError` for a blob
    that is not a readable replay and ``ValueError`` for a malformed header (as
    ``telemetry replay`` does); ``OSError`` if ``out`` cannot be written."""
    return _plot_replay(read_replay(blob), Path(out), media)


def draw_session(replay: Replay, *, media: list[dict] | None = None) -> Figure:
    """The figure :func:`plot_session` saves, for callers that want to inspect or
    restyle it (its first axes hold the angle panel, its texts the title and subtitle).
    Raises ``ValueError`` for a malformed header, as :func:`plot_session` does."""
    return draw_figure(replay, recompute(replay), stalls_from_media(media))


def _plot_replay(replay: Replay, out: Path, media: list[dict] | None) -> Path:
    fig = draw_session(replay, media=media)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out)
    return out


def plot_main(blob_path: Path, out: Path, event_path: Path | None) -> int:
    """``telemetry plot BLOB -o FILE.png [--event EVENT.json]``: 0 on success, 1 if an
    input cannot be read or does not fit (messages on stderr).

    ``EVENT.json`` is the session's end-of-session event (or the summary the end call
    returned, or just its ``media`` list); when its ``session_id``/``org_id`` are
    present they must match the blob's header."""
    try:
        blob = Path(blob_path).read_bytes()
    except OSError as exc:
        print(f"telemetry plot: cannot read {blob_path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    media: list[dict] | None = None
    event: Any = None
    if event_path is not None:
        try:
            event = json.loads(Path(event_path).read_text(encoding="utf-8"))
        except OSError as exc:
            print(f"telemetry plot: cannot read {event_path}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            print(f"telemetry plot: {event_path} is not JSON: {exc}", file=sys.stderr)
            return 1
        if isinstance(event, list):
            media = event
        elif isinstance(event, dict) and isinstance(event.get("media", []), list):
            media = event.get("media", [])
        else:
            print(f"telemetry plot: {event_path} holds neither an event with a `media` list "
                  "nor a media list", file=sys.stderr)
            return 1
    try:
        replay = read_replay(blob)
    except ReplayFormatError as exc:
        print(f"telemetry plot: {blob_path} is not a valid replay blob: {exc}", file=sys.stderr)
        return 1
    if isinstance(event, dict):
        h = replay.header
        for key, have in (("session_id", h.session_id), ("org_id", h.org_id)):
            want = event.get(key)
            if want is not None and want != have:
                print(f"telemetry plot: {event_path} is for {key} {want!r}, the blob for "
                      f"{have!r}", file=sys.stderr)
                return 1
    try:
        written = _plot_replay(replay, Path(out), media)
    except ValueError as exc:
        print(f"telemetry plot: {blob_path}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"telemetry plot: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"telemetry plot: wrote {written} ({WIDTH_PX}x{HEIGHT_PX})")
    return 0
