"""Synthetic MediaPipe Pose sessions with a known number of complete repetitions.

A small kinematic skeleton (33 MediaPipe landmarks, proportions from the body
height) is driven through a session: an optional lead-in (walking into frame,
settling, getting into position), repetitions with variable tempo, depth and
incomplete returns, partial repetitions (not counted), pauses, and a lead-out.
It is then seen by a virtual camera (view angle chosen per exercise, random
aspect ratio) and degraded like real tracking: correlated jitter, occasional
glitches, self-occlusion and visibility drops, NaN frames (no pose) and dropped
frames (gaps in ``t_ms``).

Ground truth is measured on the noise-free landmarks with this module's own
angle code, so a mistake in the engine's angle code is not hidden by sharing it.
Everything is vectorised over frames: a 60-s session takes about 25 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.reps.angles import JOINTS
from actors.reps.profiles import PROFILES
from telemetry.dev.synthetic_body import joint_params, pushup, skeleton, smooth_noise
from telemetry.dev.synthetic_camera import camera_view, degrade

KINDS = tuple(PROFILES)


@dataclass
class SyntheticSession:
    """A generated session. ``frames`` has NaN rows where no pose was detected.

    ``true_reps`` counts complete repetitions only; ``true_rom_deg`` is, per
    complete repetition, the mean over the moving sides of the range of motion
    of the profile's angle on the clean landmarks in ``space`` (2-D with the
    aspect ratio in image space); ``true_rom_sides_deg`` has it per side (None
    for a side that does not move) and the ``*3d*`` fields the anatomical 3-D
    angle. ``rep_spans_ms`` are the movement's start and end, ``rep_sides``
    which side(s) worked.
    """

    kind: str
    space: str
    aspect: float
    fps: float
    t_ms: np.ndarray
    frames: np.ndarray
    true_reps: int
    true_rom_deg: list[float]
    true_rom3d_deg: list[float]
    true_rom_sides_deg: list[tuple[float | None, float | None]]
    true_rom3d_sides_deg: list[tuple[float | None, float | None]]
    rep_spans_ms: list[tuple[float, float]]
    rep_sides: list[str]
    partial_reps: int
    yaw_deg: float
    info: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return float(self.t_ms[-1] - self.t_ms[0]) / 1000.0 if len(self.t_ms) > 1 else 0.0


# tempo (s per repetition), camera yaw range (deg; 0 = facing the camera, 90 =
# side-on; which side faces the camera is drawn, or is the working side), patient
# range of motion (uniform, degrees of the joint parameter swept), side modes.
_KIND = {
    "squat": (2.6, (35, 90), (60, 110), ("both",)),
    "lunge": (2.8, (40, 90), (55, 95), ("both",)),
    "sit_to_stand": (3.0, (40, 90), (80, 105), ("both",)),
    "hip_abduction": (2.0, (0, 20), (20, 40), ("blocks", "left", "right")),
    "lateral_raise": (2.2, (0, 25), (60, 100), ("both", "both", "alternate")),
    "shoulder_flexion": (2.5, (40, 80), (90, 150), ("both", "left", "right", "alternate")),
    "bicep_curl": (2.0, (25, 60), (90, 130), ("both", "alternate", "left", "right")),
    "shoulder_press": (2.0, (0, 25), (80, 110), ("both",)),
    "push_up": (1.8, (0, 90), (55, 95), ("both",)),
}


def _ramp(n: int, a: float, b: float) -> np.ndarray:
    """Raised-cosine move from a to b over n frames (last frame at b)."""
    if n <= 0:
        return np.empty(0)
    return a + (b - a) * (1.0 - np.cos(np.pi * np.arange(1, n + 1) / n)) / 2.0


def _schedule(rng, kind, reps, fps, tempo_var, rom_var, pause_prob, partial_prob,
              lead_in, lead_out, mode):
    """Per-frame phase for each side (0 = rest, ~1 = full excursion) and rep list."""
    tempo = _KIND[kind][0]
    ph: list[list[np.ndarray]] = [[], [], [], []]  # left, right, pre-pose weight, walking
    reps_out: list[tuple[int, int, str, bool]] = []
    cur = [0.0, 0.0]
    n = 0

    def add(a, b, pre=0.0, walk=0.0):
        nonlocal n
        k = len(a)
        for lst, v in zip(ph, (a, b, pre, walk), strict=True):
            lst.append(np.broadcast_to(np.asarray(v, dtype=float), (k,)))
        n += k

    def hold(sec, pre=0.0, walk=0.0):
        k = max(1, int(sec * fps))
        add(np.full(k, cur[0]), np.full(k, cur[1]), pre, walk)

    sts = kind == "sit_to_stand"
    if lead_in:
        cur[:] = [1.0, 1.0] if sts else [0.0, 0.0]
        hold(rng.uniform(1.0, 2.5), pre=1.0, walk=1.0)
        hold(rng.uniform(0.5, 1.5), pre=0.0 if sts else 1.0)
        k = int(rng.uniform(1.0, 2.0) * fps)
        if sts:  # sitting down is the reverse of a repetition, not one
            add(_ramp(k, 1, 0), _ramp(k, 1, 0))
            cur[:] = [0.0, 0.0]
        else:
            add(np.zeros(k), np.zeros(k), _ramp(k, 1, 0))
            if rng.random() < 0.7:  # a quick shallow adjustment (picking up weights...)
                kb = int(rng.uniform(0.3, 0.6) * fps)
                amp = rng.uniform(0.2, 0.4)
                bump = np.concatenate([_ramp(kb // 2, 0, amp), _ramp(kb - kb // 2, amp, 0)])
                still = np.zeros(kb)
                if mode == "both":
                    add(bump, bump)
                else:  # only the limb about to work moves
                    add(*((bump, still) if mode in ("left", "blocks", "alternate")
                          else (still, bump)))
    hold(rng.uniform(0.4, 1.2))
    items = []
    for _ in range(reps):
        if rng.random() < partial_prob:
            items.append(False)
        items.append(True)
    done = 0  # complete reps so far: a partial rep is made by the limb of the next one
    for i, complete in enumerate(items):
        if mode == "both":
            sides = "both"
        elif mode == "alternate":
            sides = ("left", "right")[done % 2]
        elif mode == "blocks":
            sides = "left" if done < reps // 2 else "right"
        else:
            sides = mode
        done += complete
        if i and rng.random() < pause_prob:
            hold(rng.uniform(3.0, 8.0))
        elif i:
            hold(rng.uniform(0.15, 1.2))
        amp = rng.uniform(1 - rom_var, 1 + rom_var) if complete else rng.uniform(0.15, 0.4)
        dur = tempo * rng.uniform(1 - tempo_var, 1 + tempo_var) * (1.0 if complete else 0.6)
        hold_s = rng.uniform(0.1, 0.6) if rng.random() < 0.3 else 0.0
        f_out = rng.uniform(0.35, 0.6)
        k_out = max(2, int((dur - hold_s) * f_out * fps))
        k_back = max(2, int((dur - hold_s) * (1 - f_out) * fps))
        k_hold = int(hold_s * fps)
        end = rng.uniform(0.0, 0.12) if rng.random() < 0.4 else rng.uniform(0.0, 0.03)
        start_frame = n
        tracks = []
        for s, name in enumerate(("left", "right")):
            if sides in ("both", name):
                a = min(amp, 1.0) if sts else amp
                tracks.append(np.concatenate([_ramp(k_out, cur[s], a), np.full(k_hold, a),
                                              _ramp(k_back, a, end)]))
                cur[s] = end
            else:
                tracks.append(np.full(k_out + k_hold + k_back, cur[s]))
        add(tracks[0], tracks[1])
        if complete:
            reps_out.append((start_frame, n - 1, sides, True))
    hold(rng.uniform(0.8, 2.0))
    if lead_out and rng.random() < 0.5:
        k = int(rng.uniform(1.0, 2.0) * fps)
        if sts:  # standing up to leave: half a repetition, not counted
            add(_ramp(k, cur[0], 1), _ramp(k, cur[1], 1))
            cur[:] = [1.0, 1.0]
        else:
            add(np.full(k, cur[0]), np.full(k, cur[1]), _ramp(k, 0, 1))
        hold(rng.uniform(0.5, 1.0), pre=0.0 if sts else 1.0)
    arrs = [np.concatenate(lst) for lst in ph]
    partial = len(items) - reps
    return arrs, reps_out, partial


def _angles(pts: np.ndarray, tri: tuple[int, int, int]) -> np.ndarray:
    a, b, c = pts[:, tri[0]] - pts[:, tri[1]], pts[:, tri[1]], pts[:, tri[2]] - pts[:, tri[1]]
    del b
    cos = (a * c).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _truth(pts: np.ndarray, kind: str, reps: list) -> list[tuple[float | None, float | None]]:
    """Per-side ROM of each complete rep: largest excursion from the angle at its start.

    None for a side that does not move in that rep.
    """
    prof = PROFILES[kind]
    ang = [_angles(pts, JOINTS[prof.joint][s]) for s in (0, 1)]
    out = []
    for f0, f1, sides, _ in reps:
        out.append(tuple(
            float(np.max(prof.direction * (ang[s][f0:f1 + 1] - ang[s][f0])))
            if sides in ("both", name) else None
            for s, name in ((0, "left"), (1, "right"))))
    return out


def _mean(sides: tuple) -> float:
    vals = [v for v in sides if v is not None]
    return float(np.mean(vals))


def generate(kind: str, *, reps: int, seed: int, fps: float = 30.0, space: str = "image",
             aspect: float | None = None, yaw_deg: float | None = None, mode: str | None = None,
             tempo_var: float = 0.25, rom_var: float = 0.12, pause_prob: float = 0.1,
             partial_prob: float = 0.1, noise: float = 1.0, vis_drops: float = 1.0,
             missing: float = 0.01, dropped: float = 0.01, glitches: float = 1.0,
             lead_in: bool = True, lead_out: bool = True,
             rom_deg: float | None = None) -> SyntheticSession:
    """A simulated patient doing ``reps`` complete repetitions of ``kind``.

    Knobs: ``tempo_var``/``rom_var`` (relative spread of rep duration and
    depth), ``pause_prob`` (3-8 s pause before a rep), ``partial_prob``
    (chance of a shallow, uncounted rep before each counted one), ``noise``
    (jitter scale, 0 = clean), ``vis_drops`` (rate of low-visibility episodes),
    ``glitches`` (rate of brief landmark jumps), ``missing``/``dropped`` (share
    of NaN frames / frames absent from the stream), ``lead_in``/``lead_out``
    (walking in and getting into position; getting up at the end). ``aspect``
    (width/height) and ``yaw_deg`` (camera view, 0 = frontal, 90 = left side)
    are drawn per exercise when None; ``mode`` is "both", "left", "right",
    "alternate" or "blocks" (which side moves), drawn when None. ``rom_deg``
    fixes the patient's nominal range of motion (the joint parameter swept by a
    full repetition; drawn from a typical patient range when None).

    Raises ValueError for an unknown kind, space or mode, negative ``reps`` or
    a non-positive ``fps``.
    """
    if kind not in _KIND:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if space not in ("image", "world"):
        raise ValueError(f"space must be 'image' or 'world', not {space!r}")
    if reps < 0 or not fps > 0:
        raise ValueError("reps must be >= 0 and fps > 0")
    rng = np.random.default_rng(seed)
    _, yaw_range, rom_range, modes = _KIND[kind]
    mode = mode or str(rng.choice(modes))
    if mode not in ("both", "left", "right", "alternate", "blocks"):
        raise ValueError(f"unknown mode {mode!r}")
    if aspect is None:
        aspect = float(rng.choice([16 / 9, 4 / 3, 9 / 16, 3 / 4]))
    if yaw_deg is None:
        lo, hi = yaw_range
        if mode in ("alternate", "blocks"):  # both sides work: keep both in view
            hi = min(hi, 40.0)
            lo = min(lo, hi)
        yaw_deg = float(rng.uniform(lo, hi))
        # one side working: it faces the camera (yaw > 0 shows the left side)
        yaw_deg *= {"left": 1.0, "right": -1.0}.get(mode, float(rng.choice([-1.0, 1.0])))
    h = rng.uniform(1.5, 1.9)
    rom = rng.uniform(*rom_range) if rom_deg is None else float(rom_deg)
    (pl, pr, pre, walk), rep_list, partial = _schedule(
        rng, kind, reps, fps, tempo_var, rom_var, pause_prob, partial_prob, lead_in, lead_out,
        mode)
    p = np.stack([pl, pr])
    if kind == "shoulder_press" or kind == "sit_to_stand":
        p = np.minimum(p, 1.0 if kind == "sit_to_stand" else 1.05)
    T = p.shape[1]
    t_s = np.arange(T) / fps
    if kind == "push_up":
        top = rng.uniform(160, 175)
        elbow = top - rom * p + 2.0 * smooth_noise(rng, (T, 2), 8).T
        P = pushup(np.minimum(elbow, 178.0), pre, h, rng)
    else:
        P = skeleton(joint_params(kind, p, pre, walk, t_s, rom, rng), h)
    img, world, facing = camera_view(P, yaw_deg, aspect, walk, rng, space == "world")
    clean_2d = img[..., :2] * np.array([aspect, 1.0])
    rom3d = _truth(P, kind, rep_list)
    rom_space = _truth(clean_2d, kind, rep_list) if space == "image" else rom3d

    clean = world if space == "world" else img
    frames, nan_rows = degrade(rng, clean, img, facing, space, aspect, fps, noise, vis_drops,
                                glitches, missing)
    # capture-time jitter; the session starts at exactly 0 ms
    jitter = np.clip(rng.normal(0, 1.0, T), -0.3e3 / fps, 0.3e3 / fps)
    jitter[0] = 0.0
    t_ms = t_s * 1000.0 + jitter
    keep = rng.random(T) >= dropped
    keep[0] = True
    spans = [(float(t_ms[a]), float(t_ms[b])) for a, b, _, _ in rep_list]
    return SyntheticSession(
        kind=kind, space=space, aspect=float(aspect), fps=float(fps), t_ms=t_ms[keep],
        frames=frames[keep], true_reps=len(rep_list), true_rom_deg=[_mean(r) for r in rom_space],
        true_rom3d_deg=[_mean(r) for r in rom3d], true_rom_sides_deg=rom_space,
        true_rom3d_sides_deg=rom3d, rep_spans_ms=spans, rep_sides=[r[2] for r in rep_list],
        partial_reps=partial, yaw_deg=float(yaw_deg),
        info={"mode": mode, "height_m": round(float(h), 3), "rom_nominal_deg": round(float(rom), 1),
              "nan_frames": int(nan_rows[keep].sum()), "dropped_frames": int((~keep).sum())})
