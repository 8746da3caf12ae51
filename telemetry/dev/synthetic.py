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

_L_SIDE = np.array([1, 2, 3, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31])
_R_SIDE = _L_SIDE + 1
_LIMBS = [np.array(g) for g in ((11, 13, 15, 17, 19, 21), (12, 14, 16, 18, 20, 22),
                                (23, 25, 27, 29, 31), (24, 26, 28, 30, 32))]
# face points (x to the subject's left, y down, z forward), metres at 1.7 m height
_FACE = np.array([[0, 0.0, 0.10], [0.015, -0.035, 0.09], [0.032, -0.035, 0.085],
                  [0.048, -0.035, 0.075], [-0.015, -0.035, 0.09], [-0.032, -0.035, 0.085],
                  [-0.048, -0.035, 0.075], [0.075, -0.02, 0.0], [-0.075, -0.02, 0.0],
                  [0.025, 0.03, 0.085], [-0.025, 0.03, 0.085]])


def _ramp(n: int, a: float, b: float) -> np.ndarray:
    """Raised-cosine move from a to b over n frames (last frame at b)."""
    if n <= 0:
        return np.empty(0)
    return a + (b - a) * (1.0 - np.cos(np.pi * np.arange(1, n + 1) / n)) / 2.0


def _smooth_noise(rng: np.random.Generator, shape: tuple, width: int) -> np.ndarray:
    """Unit-variance noise low-passed along axis 0 by a moving average of ``width``."""
    w = max(1, width)
    x = rng.standard_normal((shape[0] + w,) + shape[1:])
    c = np.cumsum(x, axis=0)
    return (c[w:] - c[:-w]) / np.sqrt(w)


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


_REST = {"lean": 2.0, "hf": 2.0, "ha": 4.0, "kn": 4.0, "sf": 5.0, "sa": 8.0, "el": 12.0}


def _params(kind: str, p: np.ndarray, pre: np.ndarray, walk: np.ndarray, t_s: np.ndarray,
            rom: float, rng: np.random.Generator) -> dict:
    """Joint parameters (degrees, arrays (T,) or (2, T) for left/right) for the skeleton."""
    T = p.shape[1]
    g = {k: np.full((2, T), v) if k != "lean" else np.full(T, v) for k, v in _REST.items()}
    g["plane"] = "sag"
    g["fixed"] = "both"
    pm = p.mean(axis=0)
    if kind == "squat":
        g["kn"] = 4 + rom * p
        g["hf"] = 3 + 0.85 * rom * p
        g["lean"] = 3 + 0.4 * rom * pm
        g["sf"] = 10 + 60 * p
    elif kind == "lunge":
        front = int(rng.integers(2))
        g["kn"] = 5 + rom * p * np.array([[1.0], [0.9]])[:: 1 if front == 0 else -1]
        sign = np.array([[1.0], [-1.0]])[:: 1 if front == 0 else -1]
        g["hf"] = sign * 20 + np.where(sign > 0, 0.8, 0.25) * rom * p
        g["lean"] = 3 + 5 * pm
    elif kind == "sit_to_stand":
        q = np.clip(p, 0, 1)
        g["kn"] = rom - (rom - 5) * q
        g["hf"] = 3 + 0.95 * rom * (1 - q)
        g["lean"] = 8 + 35 * np.sin(np.pi * q.mean(axis=0))
        g["sf"] = 10 + 30 * np.sin(np.pi * q)
    elif kind == "hip_abduction":
        g["ha"] = 4 + rom * p
        g["fixed"] = "auto"
    elif kind == "lateral_raise":
        g["sa"] = 8 + rom * p
        g["el"] = np.full((2, T), 15.0)
        g["plane"] = "front"
    elif kind == "shoulder_flexion":
        g["sf"] = 5 + rom * p
        g["el"] = np.full((2, T), 10.0)
    elif kind == "bicep_curl":
        g["el"] = rng.uniform(5, 20) + rom * p
        g["sf"] = 5 + 12 * p
    elif kind == "shoulder_press":
        q = np.minimum(p, 1.05)
        g["el"] = (rom + 2) * (1 - q) + 8 * q
        g["sa"] = 80 + 85 * q
        g["plane"] = "front"
    for k, v in _REST.items():  # blend towards the relaxed pre-position
        g[k] = pre * v + (1 - pre) * g[k]
    phase = 2 * np.pi * t_s / 1.1
    gait = np.stack([phase, phase + np.pi])
    g["kn"] = g["kn"] + walk * 50 * np.maximum(0, np.sin(gait)) ** 2
    g["hf"] = g["hf"] + walk * 15 * np.cos(gait)
    g["sf"] = g["sf"] - walk * 12 * np.cos(gait)
    width = 8
    for k in ("hf", "ha", "kn", "sf", "sa", "el"):
        g[k] = g[k] + 1.5 * _smooth_noise(rng, (T, 2), width).T
    g["lean"] = g["lean"] + 1.0 * _smooth_noise(rng, (T,), width)
    return g


def _dirs(flex: np.ndarray, abd: np.ndarray, sign: float) -> np.ndarray:
    """Unit limb direction: down, flexed forward by ``flex`` then abducted by ``abd`` (deg)."""
    f, a = np.radians(flex), np.radians(abd) * sign
    c = np.cos(f)
    return np.stack([-c * np.sin(a), c * np.cos(a), np.sin(f)], axis=-1)


def _skeleton(g: dict, h: float) -> np.ndarray:
    """Body-frame landmarks (T, 33, 3): x to the subject's left, y down, z forward."""
    lean = np.radians(g["lean"])
    T = lean.shape[0]
    cl, sl = np.cos(lean), np.sin(lean)
    up = np.stack([np.zeros(T), -cl, sl], axis=-1)
    fwd = np.stack([np.zeros(T), sl, cl], axis=-1)
    P = np.zeros((T, 33, 3))
    C = 0.30 * h * up
    hw, sw = 0.06 * h, 0.105 * h
    for s, sign in ((0, -1.0), (1, 1.0)):
        lat = np.array([1.0, 0, 0]) * (1 if s == 0 else -1)
        hip = lat * hw
        knee = hip + 0.245 * h * _dirs(g["hf"][s], g["ha"][s], sign)
        ankle = knee + 0.246 * h * _dirs(g["hf"][s] - g["kn"][s], g["ha"][s], sign)
        sh = C + lat * sw
        ua = _dirs(g["sf"][s], g["sa"][s], sign)
        if g["plane"] == "front":
            fa = _dirs(g["sf"][s], g["sa"][s] + g["el"][s], sign)
        else:
            fa = _dirs(g["sf"][s] + g["el"][s], g["sa"][s], sign)
        # arms hang from the trunk, so they lean with it
        ua = np.stack([ua[:, 0], ua[:, 1] * cl + ua[:, 2] * sl, -ua[:, 1] * sl + ua[:, 2] * cl], -1)
        fa = np.stack([fa[:, 0], fa[:, 1] * cl + fa[:, 2] * sl, -fa[:, 1] * sl + fa[:, 2] * cl], -1)
        el = sh + 0.186 * h * ua
        wr = el + 0.146 * h * fa
        P[:, 11 + s], P[:, 13 + s], P[:, 15 + s] = sh, el, wr
        P[:, 17 + s] = wr + h * (0.045 * fa + 0.02 * lat)
        P[:, 19 + s] = wr + h * 0.055 * fa
        P[:, 21 + s] = wr + h * (0.03 * fa - 0.015 * lat)
        P[:, 23 + s], P[:, 25 + s], P[:, 27 + s] = hip, knee, ankle
        P[:, 29 + s] = ankle + h * np.array([0, 0.025, -0.035])
        P[:, 31 + s] = ankle + h * np.array([0, 0.035, 0.09])
    head = C + 0.15 * h * up
    face = _FACE * (h / 1.7)
    P[:, :11] = (head[:, None] + face[None, :, 0:1] * np.array([1.0, 0, 0])
                 - face[None, :, 1:2] * up[:, None] + face[None, :, 2:3] * fwd[:, None])
    fixed = g["fixed"]
    ref_l, ref_r = np.array([hw, 0.491 * h, 0]), np.array([-hw, 0.491 * h, 0])
    if fixed == "auto":  # stand on whichever leg is less abducted at the moment
        w = 1.0 / (1.0 + np.exp(-(g["ha"][0] - g["ha"][1]) / 3.0))  # 1: left leg raised
        shift = w[:, None] * (ref_r - P[:, 28]) + (1 - w)[:, None] * (ref_l - P[:, 27])
    else:
        shift = (ref_l + ref_r) / 2 - (P[:, 27] + P[:, 28]) / 2
    P += shift[:, None]
    return P


def _ik(S: np.ndarray, H: np.ndarray, u: float, f: float, hint: np.ndarray) -> np.ndarray:
    """Elbow position for shoulder S and hand H, bending towards ``hint``."""
    d_vec = H - S
    d = np.linalg.norm(d_vec, axis=-1, keepdims=True)
    e = d_vec / d
    d = np.clip(d, abs(u - f) + 1e-6, u + f - 1e-6)
    a = (u * u - f * f + d * d) / (2 * d)
    hgt = np.sqrt(np.maximum(u * u - a * a, 0))
    n = hint - (e @ hint)[:, None] * e
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return S + a * e + hgt * n


def _pushup(elbow_deg: np.ndarray, pre: np.ndarray, h: float, rng) -> np.ndarray:
    """Push-up landmarks: straight body pivoting on the toes, hands on the floor.

    ``pre`` cross-fades from a standing pose (getting down and back up).
    """
    T = elbow_deg.shape[1]
    g = {k: np.full((2, T), v) if k != "lean" else np.full(T, v) for k, v in _REST.items()}
    g["hf"] = g["hf"] + 6 * _smooth_noise(rng, (T,), 15)  # hips sag and pike a little
    g.update(plane="sag", fixed="both")
    stand = _skeleton(g, h)
    toe = stand[:, 31:33].mean(axis=1)
    q = stand - toe[:, None]
    sc = (q[:, 11] + q[:, 12]) / 2
    a, c = -sc[:, 1], -sc[:, 2]
    u, f = 0.186 * h, 0.146 * h
    e = np.radians(elbow_deg)
    D = np.sqrt(u * u + f * f - 2 * u * f * np.cos(e))
    beta = np.arcsin(np.clip(D.mean(axis=0) / np.hypot(a, c), -1, 1)) - np.arctan2(c, a)
    sb, cb = np.sin(beta)[:, None], np.cos(beta)[:, None]
    W = np.stack([q[..., 0], q[..., 1] * sb + q[..., 2] * cb, -q[..., 1] * cb + q[..., 2] * sb], -1)
    for s in (0, 1):
        side = 1.0 if s == 0 else -1.0
        S = W[:, 11 + s]
        direc = np.array([0.25 * side, 1.0, 0.15])
        H = S + D[s][:, None] * direc / np.linalg.norm(direc)
        E = _ik(S, H, u, f, np.array([0.7 * side, -0.3, -0.6]))
        fa = (H - E) / f
        W[:, 13 + s], W[:, 15 + s] = E, H
        lat = np.array([side, 0, 0])
        W[:, 17 + s] = H + h * (0.045 * fa + 0.02 * lat)
        W[:, 19 + s] = H + h * 0.055 * fa
        W[:, 21 + s] = H + h * (0.03 * fa - 0.015 * lat)
    if np.any(pre > 0):
        upright = stand.copy()
        upright[..., 1] -= 0.491 * h + 0.035 * h
        upright[..., 2] += W[:, 11:13, 2].mean() - 0.25 * h
        W = pre[:, None, None] * upright + (1 - pre[:, None, None]) * W
    return W


def _rotate(P: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``P @ R.T`` for (..., 3) points, written out: BLAS is slow for 3x3 on loaded cores."""
    x, y, z = P[..., 0], P[..., 1], P[..., 2]
    return np.stack([R[i, 0] * x + R[i, 1] * y + R[i, 2] * z for i in range(3)], axis=-1)


def _camera(P: np.ndarray, yaw_deg: float, aspect: float, walk: np.ndarray, rng,
            want_world: bool):
    """Project body-frame points; returns image (x, y, z), world (hip-centred) and facing."""
    yaw, pitch = np.radians(-yaw_deg), np.radians(rng.uniform(-10, 10))
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    R_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    R_p = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    R = R_p @ np.diag([1.0, 1.0, -1.0]) @ R_y
    hips = (P[:, 23] + P[:, 24]) / 2
    still = walk < 0.5
    centre = hips[still].mean(axis=0) if still.any() else hips.mean(axis=0)
    dist = rng.uniform(2.5, 4.0)
    xc, yc, zc = (R[i, 0] * (P[..., 0] - centre[0]) + R[i, 1] * (P[..., 1] - centre[1])
                  + R[i, 2] * (P[..., 2] - centre[2]) for i in range(3))
    # walking in: enter from one side of the frame
    remaining = np.cumsum(walk[::-1])[::-1] / max(1.0, walk.sum())  # 1 -> 0 while walking
    # about 1.2 m in 1-2.5 s: an unhurried walk
    xc = xc + (walk * remaining * 1.2 * rng.choice([-1.0, 1.0]))[:, None]
    zc = zc + dist
    u, v = xc / zc, yc / zc
    us, vs = u[still], v[still]
    s = rng.uniform(0.55, 0.85) / max(np.ptp(us) / aspect, np.ptp(vs))
    mu, mv = (us.max() + us.min()) / 2, (vs.max() + vs.min()) / 2
    ox, oy = rng.uniform(-0.05, 0.05, 2)
    hz = ((zc[:, 23] + zc[:, 24]) / 2)[:, None]
    img = np.stack([0.5 + ox + (s / aspect) * (u - mu), 0.5 + oy + s * (v - mv),
                    (s / aspect) * (zc - hz) / hz], axis=-1)
    world = _rotate(P - hips[:, None], R) if want_world else None
    facing_left = -R[2, 0]
    return img, world, facing_left


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


def _degrade(rng: np.random.Generator, clean: np.ndarray, img: np.ndarray, facing: float,
             space: str, aspect: float, fps: float, noise: float, vis_drops: float,
             glitches: float, missing: float) -> tuple[np.ndarray, np.ndarray]:
    """Tracking as MediaPipe delivers it: (T, 33, 4) float32 frames and the NaN-row mask."""
    T = clean.shape[0]
    # visibility: self-occlusion of the far side, out of frame, drop episodes
    vis = np.clip(0.985 + 0.01 * _smooth_noise(rng, (T, 33), 5), 0, 0.9999)
    occ = rng.uniform(0.4, 0.8)
    far = _R_SIDE if facing > 0 else _L_SIDE
    # the far side starts to hide behind the body past ~30 degrees of yaw
    hidden = max(0.0, (abs(facing) - 0.5) / 0.5)
    vis[:, far] -= occ * hidden + 0.05 * _smooth_noise(rng, (T, far.size), 10)
    sigma = np.full((T, 33), 1.0)
    sigma[:, far] = 1.0 + hidden
    out = (img[..., 0] < 0) | (img[..., 0] > 1) | (img[..., 1] < 0) | (img[..., 1] > 1)
    vis[out] = rng.uniform(0.02, 0.3, out.sum())
    for _ in range(rng.poisson(vis_drops * T / fps / 15.0)):
        k0, k = int(rng.integers(T)), int(rng.uniform(0.3, 1.5) * fps)
        lim = _LIMBS[int(rng.integers(4))]
        vis[k0:k0 + k, lim] *= rng.uniform(0.1, 0.45)
        sigma[k0:k0 + k, lim] *= 4.0
    scale = (0.006 if space == "world" else 0.002) * noise * np.exp(rng.uniform(-0.7, 0.7))
    # uniform noise, 3-frame moving sum: cheap, and near-Gaussian after the sum
    w = rng.random((T + 2, 33, 3), dtype=np.float32) - np.float32(0.5)
    # jitter is isotropic in pixels, so normalised x (and z, same scale as x) shrink by aspect
    axes = np.ones(3) if space == "world" else np.array([1.0 / aspect, 1.0, 1.0 / aspect])
    jit = (w[:-2] + w[1:-1] + w[2:]) * (2.0 * scale * sigma[..., None] * axes).astype(np.float32)
    for _ in range(rng.poisson(glitches * T / fps / 20.0)):
        k0, k = int(rng.integers(T)), int(rng.integers(1, 4))
        lim = _LIMBS[int(rng.integers(4))]
        jit[k0:k0 + k, lim] += rng.normal(0, 0.08 if space == "world" else 0.03, 3) * axes
    frames = np.empty((T, 33, 4), dtype=np.float32)
    frames[..., :3] = clean + jit
    frames[..., 3] = np.clip(vis, 0.0, 1.0)
    nan_rows = rng.random(T) < missing
    for _ in range(rng.poisson(missing * T / fps / 2.0)):
        k0 = int(rng.integers(T))
        nan_rows[k0:k0 + int(rng.integers(3, 12))] = True
    frames[nan_rows] = np.nan
    return frames, nan_rows


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
        elbow = top - rom * p + 2.0 * _smooth_noise(rng, (T, 2), 8).T
        P = _pushup(np.minimum(elbow, 178.0), pre, h, rng)
    else:
        P = _skeleton(_params(kind, p, pre, walk, t_s, rom, rng), h)
    img, world, facing = _camera(P, yaw_deg, aspect, walk, rng, space == "world")
    clean_2d = img[..., :2] * np.array([aspect, 1.0])
    rom3d = _truth(P, kind, rep_list)
    rom_space = _truth(clean_2d, kind, rep_list) if space == "image" else rom3d

    clean = world if space == "world" else img
    frames, nan_rows = _degrade(rng, clean, img, facing, space, aspect, fps, noise, vis_drops,
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
