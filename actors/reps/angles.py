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
_TRUNK = np.array([L_SHOULDER, R_SHOULDER, L_HIP, R_HIP], dtype=np.intp)


def gather_index(triplets: np.ndarray) -> np.ndarray:
    """Landmark indices read per frame: all a's, all b's, all c's, then the trunk."""
    tri = np.asarray(triplets, dtype=np.intp).reshape(-1, 3)
    return np.concatenate([tri[:, 0], tri[:, 1], tri[:, 2], _TRUNK])


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

    NaN input gives NaN output: callers treat NaN as "not tracked" rather than
    raising, because MediaPipe emits NaN rows routinely. Two landmarks at
    exactly the same spot give 0 degrees, not an error.

    Everything is element-wise per frame (no reductions across frames, no
    BLAS), so a frame's values never depend on the batch it came in.
    """
    m = 3 * k
    g = np.take(frames, index, axis=1).astype(np.float64)  # one gather for everything
    a, b, c = g[:, :k], g[:, k:2 * k], g[:, 2 * k:m]
    vis = np.minimum(np.minimum(a[..., 3], b[..., 3]), c[..., 3])
    u = a - b
    v = c - b
    s0, s1 = g[:, m] + g[:, m + 1], g[:, m + 2] + g[:, m + 3]  # shoulders, hips (x2)
    if space == "world":
        ux, uy, uz = u[..., 0], u[..., 1], u[..., 2]
        vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
        dot = ux * vx + uy * vy + uz * vz
        cx, cy, cz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx
        cross = np.sqrt(cx * cx + cy * cy + cz * cz)
        dx, dz = s1[:, 0] - s0[:, 0], s1[:, 2] - s0[:, 2]
        horiz = np.sqrt(dx * dx + dz * dz)
        hip_x = trunk_len = None
    else:
        ux, uy, vx, vy = u[..., 0] * aspect, u[..., 1], v[..., 0] * aspect, v[..., 1]
        dot = ux * vx + uy * vy
        cross = np.abs(ux * vy - uy * vx)
        dx = (s1[:, 0] - s0[:, 0]) * aspect
        horiz = np.abs(dx)
        hip_x = s1[:, 0] * (0.5 * aspect)
        trunk_len = np.hypot(dx, s1[:, 1] - s0[:, 1]) * 0.5
    ang = np.arctan2(cross, dot) * _DEG
    trunk = np.arctan2(horiz, s1[:, 1] - s0[:, 1]) * _DEG
    return ang, vis, trunk, hip_x, trunk_len


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
