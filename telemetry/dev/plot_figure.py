"""The session figure: the drawing behind :mod:`telemetry.dev.plot`, and its PNG.

:func:`draw_figure` lays out the angle panel (joint angle per side, repetitions, their
range of motion), the tracking-quality panel and the video stalls;
:func:`save_png` renders a figure with the Agg canvas. Matplotlib is used through its
object API: no pyplot, no global backend state, nothing that needs a display.
``ValueError`` for a malformed replay header; ``OSError`` if the PNG cannot be written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
except ModuleNotFoundError as exc:
    # The plotting stack is an extra (the service image does not carry it).
    raise ModuleNotFoundError(
        f"plotting needs the `plot` extra ({exc.name} is not installed): "
        "pip install 'restartix-telemetry[plot]'", name=exc.name) from exc

from actors.reps.angles import JOINTS, SIDES, joint_triplets, triplet_angles
from actors.reps.clinical import JOINT_ANGLES, ClinicalAngle, angle_for, to_clinical
from actors.reps.detector import VIS_MIN
from actors.reps.profiles import profile_for
from storage.replay import Replay

WIDTH_PX, HEIGHT_PX, DPI = 1600, 900, 100
# A hole in the frame timeline longer than this many frame intervals breaks the lines
# (the same definition of a gap as the session's pose statistics).
GAP_FRAMES = 3.0

SIDE_COLOURS = {"left": "#1f77b4", "right": "#e8710a"}
REP_COLOUR = "#2ca02c"
ROM_COLOUR = "#1b5e20"
STALL_COLOUR = "#d62728"
SEEK_STALL_COLOUR = "#ff9896"
QUALITY_COLOUR = "#4c72b0"
NO_POSE_COLOUR = "#c0392b"
GAP_COLOUR = "#7f7f7f"


# --------------------------------------------------------------------------- drawing


def draw_figure(replay: Replay, summary: dict[str, Any],
                stalls: list[tuple[float, float, bool]]) -> Figure:
    h = replay.header
    reps: dict[str, Any] = summary["reps"]
    ex: dict[str, Any] = summary.get("exercise") or {}
    t_ms = replay.t_ms
    frames = replay.frames
    n = len(t_ms)

    fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=(4.2, 1.0), hspace=0.07,
                            left=0.058, right=0.985, top=0.845, bottom=0.075)
    ax = fig.add_subplot(grid[0])
    axq = fig.add_subplot(grid[1], sharex=ax)
    for a in (ax, axq):
        a.set_facecolor("#fbfbfb")
        a.grid(True, color="#e3e3e3", linewidth=0.8)
        a.set_axisbelow(True)
        for side in ("top", "right"):
            a.spines[side].set_visible(False)

    _title(fig, h, ex, reps, summary, n)
    if n == 0:
        ax.text(0.5, 0.5, "no frames in this replay", transform=ax.transAxes,
                ha="center", va="center", fontsize=16, color="#555555")
        for a in (ax, axq):
            a.set_xticks([])
            a.set_yticks([])
        return fig

    t_s = t_ms / 1000.0
    gaps = _gap_starts(t_ms)
    t_lo, t_hi = float(t_s[0]), float(t_s[-1])
    pad = max(0.5, 0.01 * (t_hi - t_lo))
    ax.set_xlim(t_lo - pad, t_hi + pad)

    aspect = _aspect(h.meta)
    joint = _joint_to_plot(ex, reps, frames, h.space, aspect)
    angle = _angle_to_plot(ex, joint)
    followed = _followed_sides(ex.get("side"))
    handles: list[Any] = []

    # Video stalls first, so everything else is drawn over them.
    stall_handles = _draw_stalls(ax, axq, stalls)

    # Joint angles, left and right, in the convention the rep records use.
    included, vis = triplet_angles(frames, joint_triplets([(joint, 0), (joint, 1)]), h.space,
                                   aspect)
    angles = to_clinical(angle, included)
    good = (vis >= VIS_MIN) & np.isfinite(angles)
    lw_followed, lw_other = 1.7, 1.0
    for k, side in enumerate(SIDES):
        y_all = np.where(np.isfinite(angles[:, k]), angles[:, k], np.nan)
        y_good = np.where(good[:, k], angles[:, k], np.nan)
        colour = SIDE_COLOURS[side]
        is_followed = side in followed
        x_b, y_b = _broken(t_s, y_all, gaps)
        ax.plot(x_b, y_b, color=colour, linewidth=0.8, alpha=0.28, zorder=2)
        x_b, y_b = _broken(t_s, y_good, gaps)
        label = f"{side} {joint}" + ("" if is_followed else " (not followed)")
        (line,) = ax.plot(x_b, y_b, color=colour, zorder=3, label=label,
                          linewidth=lw_followed if is_followed else lw_other,
                          alpha=1.0 if is_followed else 0.55,
                          linestyle="-" if is_followed else "--")
        handles.append(line)
    handles.append(Line2D([], [], color="#999999", linewidth=0.8, alpha=0.5,
                          label=f"visibility < {VIS_MIN:g}"))

    finite = angles[np.isfinite(angles)]
    y_lo = float(np.min(finite)) if finite.size else 0.0
    y_hi = float(np.max(finite)) if finite.size else 180.0
    span = max(20.0, y_hi - y_lo)
    ax.set_ylim(max(-5.0, y_lo - 0.08 * span), y_hi + 0.22 * span)
    ax.set_ylabel(f"{angle.label}  (°)", fontsize=11)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))

    handles.extend(_draw_reps(fig, ax, axq, reps.get("reps") or [], t_hi - t_lo + 2 * pad))
    handles.extend(stall_handles)

    handles.extend(_draw_quality(axq, t_s, frames, gaps))

    axq.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _mmss(v)))
    axq.xaxis.set_major_locator(MaxNLocator(nbins=14, steps=[1, 2, 3, 5, 6, 10]))
    axq.set_xlabel("session time (m:ss, client clock)", fontsize=11)
    ax.tick_params(labelbottom=False)
    _legend(fig, handles)
    return fig


def _legend(fig: Figure, handles: list[Any]) -> None:
    """One row of legend entries under the title; two rows if one is wider than the figure."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    for ncol in (len(handles), math.ceil(len(handles) / 2)):
        legend = fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.52, 0.905),
                            ncol=ncol, frameon=False, fontsize=10, handlelength=2.2,
                            columnspacing=1.4)
        if legend.get_window_extent(renderer=canvas.get_renderer()).width <= 0.97 * (
                fig.get_figwidth() * fig.dpi):
            return
        legend.remove()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.52, 0.905),
               ncol=math.ceil(len(handles) / 2), frameon=False, fontsize=9, handlelength=2.0,
               columnspacing=1.0)


def _title(fig: Figure, h: Any, ex: Mapping[str, Any], reps: Mapping[str, Any],
           summary: Mapping[str, Any], n: int) -> None:
    kind = ex.get("kind")
    profile = profile_for(kind)
    name = (profile.kind if profile else (kind or "unknown exercise")).replace("_", " ")
    count = reps.get("rep_count", 0)
    target = reps.get("target_reps")
    head = f"{name.capitalize()}: {count} rep{'s' if count != 1 else ''}"
    if target:
        head += f" of {target}"
    fig.text(0.058, 0.962, head, fontsize=18, fontweight="bold", ha="left", va="center")

    pose = summary.get("pose") or {}
    parts = [f"session {h.session_id}", f"org {h.org_id}"]
    if n:
        parts.append(f"{_mmss(float(pose.get('duration_ms') or 0) / 1000.0)} long")
        parts.append(f"{n} frames" + (f" at {pose['effective_fps']:g} fps"
                                       if pose.get("effective_fps") else ""))
    parts.append(f"{h.space} coordinates")
    # how the blob was stored: for support, not for the clinician reading the title
    parts.append(f"encoding {h.encoding}")
    if reps.get("angle_min_deg") is not None and reps.get("angle"):
        parts.append(f"{str(reps['angle']).replace('_', ' ')} "
                     f"{reps['angle_min_deg']:.0f}–{reps['angle_max_deg']:.0f}°")
    if reps.get("rom_mean_deg") is not None:
        parts.append(f"ROM mean {reps['rom_mean_deg']:.0f}° "
                     f"({reps['rom_min_deg']:.0f}–{reps['rom_max_deg']:.0f}°)")
    if reps.get("tempo_mean_ms") is not None:
        parts.append(f"tempo {reps['tempo_mean_ms'] / 1000:.1f} s")
    if reps.get("symmetry_mean") is not None:
        parts.append(f"symmetry {reps['symmetry_mean']:.2f}")
    if n:
        parts.append(f"tracked {100 * float(reps.get('tracked_fraction') or 0):.0f}%")
    if reps.get("fallback"):
        parts.append("kind not recognised: joint chosen by the engine")
    sub = fig.text(0.058, 0.925, "   ·   ".join(parts), fontsize=11, color="#444444",
                   ha="left", va="center")
    # Long ids or many figures: shrink the line to the figure's width rather than cut it.
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    # Text width is not quite proportional to the font size (hinting), so re-measure.
    room = (0.985 - 0.058) * fig.get_figwidth() * fig.dpi
    for _ in range(4):
        width = sub.get_window_extent(renderer=canvas.get_renderer()).width
        size = sub.get_fontsize()
        if width <= room or size <= 7.0:
            break
        sub.set_fontsize(max(7.0, size * room / width * 0.99))


def _draw_reps(fig: Figure, ax: Any, axq: Any, reps: Sequence[Mapping[str, Any]],
               x_span_s: float) -> list[Any]:
    """Shade each repetition, draw its trough-to-peak bar and label it."""
    if not reps:
        ax.text(0.5, 0.955, "no repetitions detected", transform=ax.transAxes, ha="center",
                va="top", fontsize=11, color="#555555")
        return []
    axes_px = fig.get_figwidth() * fig.dpi * (ax.get_position().x1 - ax.get_position().x0)
    px_per_s = axes_px / x_span_s if x_span_s > 0 else 0.0
    centres = [(float(r["start_ms"]) + float(r["end_ms"])) / 2000.0 for r in reps]
    spacing_px = float(np.median(np.diff(centres))) * px_per_s if len(centres) > 1 else axes_px
    # Rep numbers only when most reps have room for them; the ROM labels go on two rows,
    # each label on the first row where it does not touch its left neighbour, and are
    # left out where both rows are taken (the bar still shows the range).
    with_number = spacing_px >= 52
    min_gap_px = 40.0 if with_number else 34.0
    rows_y = (0.985, 0.925) if with_number else (0.985, 0.945)
    last_px = [-math.inf, -math.inf]
    label_y = ax.get_xaxis_transform()
    for r in reps:
        start, end = float(r["start_ms"]) / 1000.0, float(r["end_ms"]) / 1000.0
        ax.axvspan(start, end, color=REP_COLOUR, alpha=0.15, linewidth=0, zorder=1)
        axq.axvspan(start, end, color=REP_COLOUR, alpha=0.08, linewidth=0, zorder=1)
        mid = (start + end) / 2.0
        lo, hi = float(r["angle_min_deg"]), float(r["angle_max_deg"])
        ax.plot([mid, mid], [lo, hi], color=ROM_COLOUR,
                linewidth=2.2, solid_capstyle="butt", zorder=4, alpha=0.9)
        ax.plot([mid], [hi], marker="_", markersize=9, color=ROM_COLOUR,
                markeredgewidth=2.2, zorder=4)
        ax.plot([mid], [lo], marker="_", markersize=9, color=ROM_COLOUR,
                markeredgewidth=2.2, zorder=4)
        x_px = mid * px_per_s
        row = next((k for k in (0, 1) if x_px - last_px[k] >= min_gap_px), None)
        if row is None:
            continue
        last_px[row] = x_px
        text = f"{float(r['rom_deg']):.0f}°"
        if with_number:
            text = f"#{r['index']}\n{text}"
        ax.text(mid, rows_y[row], text, transform=label_y, ha="center", va="top",
                fontsize=9.5 if with_number else 8.5, color=ROM_COLOUR, fontweight="bold",
                zorder=5)
    return [Patch(facecolor=REP_COLOUR, alpha=0.3, label="repetition"),
            Line2D([], [], color=ROM_COLOUR, linewidth=2.2, label="range of motion (°)")]


def _draw_stalls(ax: Any, axq: Any, stalls: list[tuple[float, float, bool]]) -> list[Any]:
    handles = []
    kinds_seen = set()
    for start_ms, end_ms, after_seek in stalls:
        colour = SEEK_STALL_COLOUR if after_seek else STALL_COLOUR
        for a, alpha in ((ax, 0.20), (axq, 0.30)):
            # An edge keeps a sub-second stall visible on a long session.
            a.axvspan(start_ms / 1000.0, end_ms / 1000.0, facecolor=colour, alpha=alpha,
                      edgecolor=colour, linewidth=0.8, hatch="///", zorder=0.5)
        kinds_seen.add(after_seek)
    if False in kinds_seen:
        handles.append(Patch(facecolor=STALL_COLOUR, alpha=0.35, hatch="///",
                             edgecolor=STALL_COLOUR, label="video stall"))
    if True in kinds_seen:
        handles.append(Patch(facecolor=SEEK_STALL_COLOUR, alpha=0.45, hatch="///",
                             edgecolor=SEEK_STALL_COLOUR, label="stall after seek"))
    return handles


def _draw_quality(axq: Any, t_s: np.ndarray, frames: np.ndarray,
                  gaps: np.ndarray) -> list[Any]:
    """Mean landmark visibility per frame; no-pose frames and frame gaps marked."""
    v = frames[:, :, 3] if frames.shape[2] > 3 else np.full(frames.shape[:2], np.nan)
    ok = np.isfinite(v)
    count = ok.sum(axis=1)
    mean_vis = np.where(count > 0, np.where(ok, v, 0.0).sum(axis=1) / np.maximum(count, 1),
                        np.nan)
    no_pose = ~np.isfinite(frames).any(axis=(1, 2))
    x_b, y_b = _broken(t_s, mean_vis, gaps)
    axq.fill_between(x_b, 0.0, y_b, color=QUALITY_COLOUR, alpha=0.25, linewidth=0, zorder=2)
    axq.plot(x_b, y_b, color=QUALITY_COLOUR, linewidth=1.0, zorder=3)
    axq.axhline(VIS_MIN, color="#555555", linewidth=0.9, linestyle=":", zorder=3)
    axq.text(1.0, VIS_MIN, f" engine threshold {VIS_MIN:g}", transform=axq.get_yaxis_transform(),
             ha="right", va="bottom", fontsize=8.5, color="#555555")
    handles: list[Any] = [Line2D([], [], color=QUALITY_COLOUR, linewidth=1.2,
                                label="mean landmark visibility")]
    if no_pose.any():
        axq.plot(t_s[no_pose], np.full(int(no_pose.sum()), 0.08), linestyle="none",
                 marker="|", markersize=14, markeredgewidth=1.4, color=NO_POSE_COLOUR, zorder=4)
        handles.append(Line2D([], [], linestyle="none", marker="|", markersize=10,
                              markeredgewidth=1.4, color=NO_POSE_COLOUR,
                              label=f"no pose ({int(no_pose.sum())} frames)"))
    if gaps.size:
        for i in gaps:
            axq.axvspan(t_s[i - 1], t_s[i], facecolor="none", edgecolor=GAP_COLOUR,
                        hatch="xx", linewidth=0, alpha=0.6, zorder=1)
        handles.append(Patch(facecolor="none", edgecolor=GAP_COLOUR, hatch="xx",
                             label="no frames received"))
    axq.set_ylim(0.0, 1.05)
    axq.set_yticks([0.0, 0.5, 1.0])
    axq.set_ylabel("tracking", fontsize=11)
    return handles


# --------------------------------------------------------------------------- helpers


def save_png(fig: Figure, out: Path) -> None:
    """Render with Agg and save as a 256-colour PNG: a plot has few colours, and the
    palette makes the file 2-3 times smaller than RGBA with no visible loss."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    image = Image.fromarray(np.ascontiguousarray(rgb)).quantize(
        colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    info = PngInfo()
    info.add_text("Software", "restartix-telemetry")
    image.save(out, format="PNG", optimize=True, pnginfo=info)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _aspect(meta: Mapping[str, Any]) -> float:
    w, hgt = meta.get("image_width") or 0, meta.get("image_height") or 0
    return w / hgt if is_number(w) and is_number(hgt) and w > 0 and hgt > 0 else 1.0


def _followed_sides(side: Any) -> tuple[str, ...]:
    return (side,) if side in SIDES else SIDES


def _joint_to_plot(ex: Mapping[str, Any], reps: Mapping[str, Any], frames: np.ndarray,
                   space: str, aspect: float) -> str:
    """The profile's joint; else the one the engine fell back to; else the joint whose
    angle moved most (5th to 95th percentile), for a session without repetitions."""
    profile = profile_for(ex.get("kind"))
    if profile is not None:
        return profile.joint
    if reps.get("joint") in JOINTS:
        return str(reps["joint"])
    best, best_range = "knee", -1.0
    for joint in JOINTS:
        ang, vis = triplet_angles(frames, joint_triplets([(joint, 0), (joint, 1)]), space,
                                  aspect)
        good = ang[(vis >= VIS_MIN) & np.isfinite(ang)]
        if good.size >= 10:
            lo, hi = np.percentile(good, [5, 95])
            if hi - lo > best_range:
                best, best_range = joint, float(hi - lo)
    return best


def _angle_to_plot(ex: Mapping[str, Any], joint: str) -> ClinicalAngle:
    """The profile's reported angle (``hip_abduction`` reads the hip as abduction);
    without a profile, the joint's (as the engine's fallback reports it)."""
    profile = profile_for(ex.get("kind"))
    return angle_for(profile) if profile is not None else JOINT_ANGLES[joint]


def _gap_starts(t_ms: np.ndarray) -> np.ndarray:
    """Indices i where the step t[i-1] -> t[i] is a hole in the timeline."""
    if len(t_ms) < 3:
        return np.zeros(0, dtype=np.intp)
    dt = np.diff(t_ms)
    typical = float(np.median(dt))
    if not typical > 0:
        return np.zeros(0, dtype=np.intp)
    return (np.flatnonzero(dt > GAP_FRAMES * typical) + 1).astype(np.intp)


def _broken(x: np.ndarray, y: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x, y`` with a NaN inserted at every gap, so lines do not bridge missing time."""
    if not gaps.size:
        return x, y
    return np.insert(x, gaps, np.nan), np.insert(y, gaps, np.nan)


def _mmss(seconds: float) -> str:
    if not math.isfinite(seconds):
        return ""
    sign = "-" if seconds < 0 else ""
    s = int(round(abs(seconds)))
    return f"{sign}{s // 60}:{s % 60:02d}"
