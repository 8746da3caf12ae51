"""The simulated body of :mod:`telemetry.dev.synthetic`: a kinematic skeleton of the 33
MediaPipe landmarks, its proportions from the body height, driven by joint angles.

:func:`joint_params` turns a repetition schedule into joint angles per exercise,
:func:`skeleton` poses the standing body, :func:`pushup` the body on the floor.
Pure, vectorised over frames; the only randomness is the generator passed in.
"""

from __future__ import annotations

import numpy as np

# face points (x to the subject's left, y down, z forward), metres at 1.7 m height
_FACE = np.array([[0, 0.0, 0.10], [0.015, -0.035, 0.09], [0.032, -0.035, 0.085],
                  [0.048, -0.035, 0.075], [-0.015, -0.035, 0.09], [-0.032, -0.035, 0.085],
                  [-0.048, -0.035, 0.075], [0.075, -0.02, 0.0], [-0.075, -0.02, 0.0],
                  [0.025, 0.03, 0.085], [-0.025, 0.03, 0.085]])


def smooth_noise(rng: np.random.Generator, shape: tuple, width: int) -> np.ndarray:
    """Unit-variance noise low-passed along axis 0 by a moving average of ``width``."""
    w = max(1, width)
    x = rng.standard_normal((shape[0] + w,) + shape[1:])
    c = np.cumsum(x, axis=0)
    return (c[w:] - c[:-w]) / np.sqrt(w)


_REST = {"lean": 2.0, "hf": 2.0, "ha": 4.0, "kn": 4.0, "sf": 5.0, "sa": 8.0, "el": 12.0}


def joint_params(kind: str, p: np.ndarray, pre: np.ndarray, walk: np.ndarray,
                 t_s: np.ndarray, rom: float, rng: np.random.Generator) -> dict:
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
        g[k] = g[k] + 1.5 * smooth_noise(rng, (T, 2), width).T
    g["lean"] = g["lean"] + 1.0 * smooth_noise(rng, (T,), width)
    return g


def _dirs(flex: np.ndarray, abd: np.ndarray, sign: float) -> np.ndarray:
    """Unit limb direction: down, flexed forward by ``flex`` then abducted by ``abd`` (deg)."""
    f, a = np.radians(flex), np.radians(abd) * sign
    c = np.cos(f)
    return np.stack([-c * np.sin(a), c * np.cos(a), np.sin(f)], axis=-1)


def skeleton(g: dict, h: float) -> np.ndarray:
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


def pushup(elbow_deg: np.ndarray, pre: np.ndarray, h: float, rng) -> np.ndarray:
    """Push-up landmarks: straight body pivoting on the toes, hands on the floor.

    ``pre`` cross-fades from a standing pose (getting down and back up).
    """
    T = elbow_deg.shape[1]
    g = {k: np.full((2, T), v) if k != "lean" else np.full(T, v) for k, v in _REST.items()}
    g["hf"] = g["hf"] + 6 * smooth_noise(rng, (T,), 15)  # hips sag and pike a little
    g.update(plane="sag", fixed="both")
    stand = skeleton(g, h)
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
