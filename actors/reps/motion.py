"""Detect the patient walking about, so strides are not taken for repetitions.

Only used in image space for profiles whose hips stay put during a repetition
(upper-body exercises, hip abduction): there, the hips travelling sideways
across the image means the patient is walking, typically into position. World
coordinates from MediaPipe are hip-centred and carry no such information.
"""

from __future__ import annotations

import numpy as np

LAG = 15  # frames over which the displacement is measured (0.5 s at 30 fps)
MAX_SPEED = 0.5  # trunk lengths per second; walking is 1-3, fidgeting well below


class WalkGate:
    """Flags frames in which the hips travel faster than ``MAX_SPEED`` sideways.

    Keeps the last ``LAG`` frames' hip position and time, so its memory is
    fixed and a frame's verdict does not depend on how the stream was batched.
    Frames with missing landmarks are never flagged (their verdict is left to
    the visibility test) and do not enter the history.
    """

    def __init__(self) -> None:
        self._x = np.empty(0)
        self._t = np.empty(0)

    def moving(self, t: np.ndarray, hip_x: np.ndarray, trunk_len: np.ndarray) -> np.ndarray:
        """Boolean (n,): True where the patient is walking about.

        ``hip_x`` and ``trunk_len`` are in the same unit (frame heights), as
        returned by ``angles.batch_features`` in image space.
        """
        ok = trunk_len > 0  # False for NaN
        all_ok = np.count_nonzero(ok) == ok.size
        hx, tt, tl = (hip_x, t, trunk_len) if all_ok else (hip_x[ok], t[ok], trunk_len[ok])
        xs = np.concatenate([self._x, hx])
        ts = np.concatenate([self._t, tt])
        c, n = self._x.size, hx.size
        if c == LAG:
            lag_x, lag_t = xs[:n], ts[:n]
        else:  # start of the stream: compare with the oldest frame seen
            lag = np.maximum(np.arange(c - LAG, c - LAG + n), 0)
            lag_x, lag_t = xs[lag], ts[lag]
        # |dx| / dt > MAX_SPEED * trunk, with dt in ms, written without a division
        fast = np.abs(xs[c:] - lag_x) * 1000.0 > MAX_SPEED * tl * (ts[c:] - lag_t)
        self._x, self._t = xs[-LAG:], ts[-LAG:]
        if all_ok:
            return fast
        out = np.zeros(t.shape[0], dtype=bool)
        out[ok] = fast
        return out
