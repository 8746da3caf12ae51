"""Detect the patient walking about, so strides are not taken for repetitions.

Only used in image space for profiles whose hips stay put during a repetition
(upper-body exercises, hip abduction): there, the hips travelling sideways
across the image means the patient is walking, typically into position. World
coordinates from MediaPipe are hip-centred and carry no such information.
"""

from __future__ import annotations

import numpy as np

from .angles import L_HIP, L_SHOULDER, R_HIP, R_SHOULDER

LAG = 15  # frames over which the displacement is measured (0.5 s at 30 fps)
MAX_SPEED = 0.5  # trunk lengths per second; walking is 1-3, fidgeting well below


class WalkGate:
    """Flags frames in which the hips travel faster than ``MAX_SPEED`` sideways.

    Keeps the last ``LAG`` frames' hip position and time, so its memory is
    fixed and a frame's verdict does not depend on how the stream was batched.
    Frames with missing landmarks are never flagged (their verdict is left to
    the visibility test) and do not enter the history.
    """

    def __init__(self, aspect: float) -> None:
        self.aspect = aspect
        self._x = np.empty(0)
        self._t = np.empty(0)

    def moving(self, t: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Boolean (n,): True where the patient is walking about."""
        p = frames[:, (L_SHOULDER, R_SHOULDER, L_HIP, R_HIP), :2].astype(np.float64)
        hx = (p[:, 2, 0] + p[:, 3, 0]) * (0.5 * self.aspect)
        dx = (p[:, 2, 0] + p[:, 3, 0] - p[:, 0, 0] - p[:, 1, 0]) * (0.5 * self.aspect)
        dy = (p[:, 2, 1] + p[:, 3, 1] - p[:, 0, 1] - p[:, 1, 1]) * 0.5
        trunk = np.sqrt(dx * dx + dy * dy)
        ok = (hx == hx) & (trunk > 0)
        xs = np.concatenate([self._x, hx[ok]])
        ts = np.concatenate([self._t, t[ok]])
        c = self._x.size
        n = int(ok.sum())
        idx = np.arange(c, c + n)
        lag = np.maximum(idx - LAG, 0)
        dt = ts[idx] - ts[lag]
        speed = np.abs(xs[idx] - xs[lag]) * 1000.0 / np.where(dt > 0, dt, np.inf)
        out = np.zeros(t.shape[0], dtype=bool)
        out[ok] = speed > MAX_SPEED * trunk[ok]
        self._x, self._t = xs[-LAG:], ts[-LAG:]
        return out
