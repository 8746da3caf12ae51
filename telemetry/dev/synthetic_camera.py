"""How the camera and the tracker see the simulated body of :mod:`telemetry.dev.synthetic`.

:func:`camera_view` projects the body-frame landmarks through a virtual camera (view
angle, pitch, distance, walking into frame); :func:`degrade` turns the clean
landmarks into what MediaPipe delivers: correlated jitter, glitches, self-occlusion
and visibility drops, NaN frames. Pure; the only randomness is the generator passed in.
"""

from __future__ import annotations

import numpy as np

from telemetry.dev.synthetic_body import smooth_noise

_L_SIDE = np.array([1, 2, 3, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31])
_R_SIDE = _L_SIDE + 1
_LIMBS = [np.array(g) for g in ((11, 13, 15, 17, 19, 21), (12, 14, 16, 18, 20, 22),
                                (23, 25, 27, 29, 31), (24, 26, 28, 30, 32))]


def _rotate(P: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``P @ R.T`` for (..., 3) points, written out: BLAS is slow for 3x3 on loaded cores."""
    x, y, z = P[..., 0], P[..., 1], P[..., 2]
    return np.stack([R[i, 0] * x + R[i, 1] * y + R[i, 2] * z for i in range(3)], axis=-1)


def camera_view(P: np.ndarray, yaw_deg: float, aspect: float, walk: np.ndarray, rng,
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


def degrade(rng: np.random.Generator, clean: np.ndarray, img: np.ndarray, facing: float,
            space: str, aspect: float, fps: float, noise: float, vis_drops: float,
            glitches: float, missing: float) -> tuple[np.ndarray, np.ndarray]:
    """Tracking as MediaPipe delivers it: (T, 33, 4) float32 frames and the NaN-row mask."""
    T = clean.shape[0]
    # visibility: self-occlusion of the far side, out of frame, drop episodes
    vis = np.clip(0.985 + 0.01 * smooth_noise(rng, (T, 33), 5), 0, 0.9999)
    occ = rng.uniform(0.4, 0.8)
    far = _R_SIDE if facing > 0 else _L_SIDE
    # the far side starts to hide behind the body past ~30 degrees of yaw
    hidden = max(0.0, (abs(facing) - 0.5) / 0.5)
    vis[:, far] -= occ * hidden + 0.05 * smooth_noise(rng, (T, far.size), 10)
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
