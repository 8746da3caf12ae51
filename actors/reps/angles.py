"""Joint angles from MediaPipe Pose landmarks, vectorised over a batch of frames.

Angles are computed per frame with element-wise numpy operations only, so the
value for a frame never depends on which other frames share its batch (the
engine's batch-split invariance relies on this).
"""

from __future__ import annotations

import numpy as np

N_LANDMARKS = 33

# MediaPipe Pose landmark indices ("left" is the subject's left).
NOSE = 0
L_SHOULDER, R_SHOULDER = 11, 12
L_ELBOW, R_ELBOW = 13, 14
L_WRIST, R_WRIST = 15, 16
L_HIP, R_HIP = 23, 24
L_KNEE, R_KNEE = 25, 26
L_ANKLE, R_ANKLE = 27, 28

SIDES = ("left", "right")

# joint name -> ((a, b, c) for the left side, (a, b, c) for the right side);
# the angle is measured at b between the segments b->a and b->c.
JOINTS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "knee": ((L_HIP, L_KNEE, L_ANKLE), (R_HIP, R_KNEE, R_ANKLE)),
    "elbow": ((L_SHOULDER, L_ELBOW, L_WRIST), (R_SHOULDER, R_ELBOW, R_WRIST)),
    "shoulder": ((L_HIP, L_SHOULDER, L_ELBOW), (R_HIP, R_SHOULDER, R_ELBOW)),
    # trunk side vs thigh: closes with hip flexion (sagittal) and with abduction
    # (frontal); the long shoulder-hip segment makes it far less noisy than an
    # angle against the short pelvis line
    "hip": ((L_SHOULDER, L_HIP, L_KNEE), (R_SHOULDER, R_HIP, R_KNEE)),
}

JOINT_LABELS = {
    "knee": "knee flexion (hip-knee-ankle)",
    "elbow": "elbow flexion (shoulder-elbow-wrist)",
    "shoulder": "shoulder angle (hip-shoulder-elbow)",
    "hip": "hip angle (shoulder-hip-knee)",
}

SPACES = ("image", "world")


_DEG = 180.0 / np.pi
# shoulders and hips, laid out so that one addition of the first pair to the second
# gives both midpoints (times two): (L_SHOULDER + R_SHOULDER, L_HIP + R_HIP)
_TRUNK = np.array([L_SHOULDER, L_HIP, R_SHOULDER, R_HIP], dtype=np.intp)
# Channels read per landmark slot, in this order: visibility, x, y, then z, x, y for
# world space only (image space reads the first three rows). The cyclic x, y, z, x, y
# lets one product of shifted rows give all three cross-product terms.
_CHANNELS = np.array([3, 0, 1, 2, 0, 1], dtype=np.intp)
_IMAGE_ROWS = 3


def gather_index(triplets: np.ndarray) -> np.ndarray:
    """What ``batch_features`` reads per frame, as flat indices into a frame's 33 x 4
    values, channel-major: for each channel of ``_CHANNELS``, the landmark slots
    all a's, all c's, all b's twice (b->a and b->c come out of one subtraction),
    then the trunk."""
    tri = np.asarray(triplets, dtype=np.intp).reshape(-1, 3)
    slots = np.concatenate([tri[:, 0], tri[:, 2], tri[:, 1], tri[:, 1], _TRUNK])
    return (_CHANNELS[:, None] + 4 * slots[None, :]).ravel()


def batch_features(
    frames: np.ndarray, index: np.ndarray, k: int, space: str, aspect: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Joint angles, their visibility and the trunk inclination for a batch.

    ``frames`` is (n, 33, 4); ``index`` comes from ``gather_index`` for k
    triplets (a, b, c), the angle being measured at b between b->a and b->c.
    ``space`` "image" gives the 2-D angle in the image plane with x scaled by
    ``aspect`` (width/height) so pixels are square; "world" the 3-D angle.

    Returns angles (n, k) in degrees (float64), visibility (n, k) (the smallest
    of the three landmarks'), trunk inclination (n,) in degrees (0 = upright,
    90 = lying, 180 = upside down in the image, as a push-up filmed head-on
    looks), and in image space the hip midpoint's x and the trunk length
    (shoulder to hip midpoints), both in frame heights (None in world space).
    The (n, k) arrays are transposed views of (k, n) arrays, so that their ``.T``
    (one series per row) is contiguous.

    NaN input gives NaN output: callers treat NaN as "not tracked" rather than
    raising, because MediaPipe emits NaN rows routinely. Two landmarks at
    exactly the same spot give 0 degrees, not an error.

    Everything is element-wise per frame (no reductions across frames, no
    BLAS), so a frame's values never depend on the batch it came in.
    """
    n = frames.shape[0]
    m = 4 * k
    world = space == "world"
    if not world:
        index = index[: _IMAGE_ROWS * (m + 4)]
    # one gather for everything: g[row, landmark slot, frame], each row a contiguous
    # series, so a few numpy operations cover all angles at once
    g = frames.reshape(n, -1).T[index].astype(np.float64).reshape(-1, m + 4, n)
    co = g[1:]  # coordinates: x, y (, z, x, y)
    uv = co[:, :2 * k] - co[:, 2 * k:m]  # u = a - b in slots :k, v = c - b in k:2k
    vis = np.minimum(np.minimum(g[0, :k], g[0, 2 * k:3 * k]), g[0, k:2 * k])
    nt = 3 if world else 2
    s = co[:nt, m:m + 2] + co[:nt, m + 2:m + 4]  # [:, 0] shoulders, [:, 1] hips (x2)
    d = s[:, 1] - s[:, 0]  # hips - shoulders, per coordinate
    u, v = uv[:, :k], uv[:, k:]
    dy = d[1]
    if world:
        p = u[:3] * v[:3]
        dot = p[0] + p[1] + p[2]  # ux*vx + uy*vy + uz*vz
        c = u[1:4] * v[2:5] - u[2:5] * v[1:4]  # (uy*vz - uz*vy, uz*vx - ux*vz, ux*vy - uy*vx)
        c *= c
        cross = np.sqrt(c[0] + c[1] + c[2])
        dd = d * d
        horiz = np.sqrt(dd[0] + dd[2])  # sqrt(dx*dx + dz*dz)
        hip_x = trunk_len = None
    else:
        ux, vx = u[0] * aspect, v[0] * aspect
        uy, vy = u[1], v[1]
        dot = ux * vx + uy * vy
        cross = np.abs(ux * vy - uy * vx)
        dx = d[0] * aspect
        horiz = np.abs(dx)
        hip_x = s[0, 1] * (0.5 * aspect)
        trunk_len = np.hypot(dx, dy) * 0.5
    ang = np.arctan2(cross, dot) * _DEG
    trunk = np.arctan2(horiz, dy) * _DEG
    return ang.T, vis.T, trunk, hip_x, trunk_len


def triplet_angles(
    frames: np.ndarray, triplets: np.ndarray, space: str, aspect: float
) -> tuple[np.ndarray, np.ndarray]:
    """Angles (degrees) and visibilities (n, k) for k landmark triplets; see ``batch_features``."""
    triplets = np.asarray(triplets, dtype=np.intp).reshape(-1, 3)
    ang, vis = batch_features(frames, gather_index(triplets), len(triplets), space, aspect)[:2]
    return ang, vis


def trunk_inclination(frames: np.ndarray, space: str, aspect: float) -> np.ndarray:
    """Trunk inclination per frame, degrees in [0, 180]; see ``batch_features``."""
    return batch_features(frames, gather_index(np.empty((0, 3))), 0, space, aspect)[2]


def joint_triplets(joints: list[tuple[str, int]]) -> np.ndarray:
    """Stack (joint name, side index) pairs into a (k, 3) landmark index array.

    Raises KeyError for an unknown joint name and IndexError for a side other
    than 0 (left) or 1 (right).
    """
    return np.array([JOINTS[name][side] for name, side in joints], dtype=np.intp)
