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
    "hip": ((L_SHOULDER, L_HIP, L_KNEE), (R_SHOULDER, R_HIP, R_KNEE)),
    # pelvis line vs thigh: ~90 deg standing, grows with abduction
    "hip_abduction": ((R_HIP, L_HIP, L_KNEE), (L_HIP, R_HIP, R_KNEE)),
}

JOINT_LABELS = {
    "knee": "knee flexion (hip-knee-ankle)",
    "elbow": "elbow flexion (shoulder-elbow-wrist)",
    "shoulder": "shoulder angle (hip-shoulder-elbow)",
    "hip": "hip angle (shoulder-hip-knee)",
    "hip_abduction": "hip abduction (other hip-hip-knee)",
}

SPACES = ("image", "world")


def triplet_angles(
    frames: np.ndarray,
    triplets: np.ndarray,
    space: str,
    aspect: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Angles (degrees) and visibilities for k landmark triplets over n frames.

    ``frames`` is (n, 33, 4); ``triplets`` an int array (k, 3). ``space`` is
    "image" (2-D angle in the image plane, x scaled by ``aspect`` = width/height
    so that a pixel is square) or "world" (3-D angle from metric x, y, z).

    Returns ``(angles, vis)``, both float64 (n, k). ``vis`` is the smallest
    visibility of the three landmarks. A frame whose landmarks are NaN, or whose
    segments have zero length, gets a NaN angle; callers treat NaN as "not
    tracked" rather than raising, because MediaPipe emits NaN rows routinely.
    """
    pts = frames[:, triplets, :].astype(np.float64)  # (n, k, 3, 4)
    a, b, c = pts[:, :, 0], pts[:, :, 1], pts[:, :, 2]
    vis = np.minimum(np.minimum(a[..., 3], b[..., 3]), c[..., 3])
    if space == "world":
        u = a[..., :3] - b[..., :3]
        v = c[..., :3] - b[..., :3]
        cx = u[..., 1] * v[..., 2] - u[..., 2] * v[..., 1]
        cy = u[..., 2] * v[..., 0] - u[..., 0] * v[..., 2]
        cz = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
        cross = np.sqrt(cx * cx + cy * cy + cz * cz)
        dot = u[..., 0] * v[..., 0] + u[..., 1] * v[..., 1] + u[..., 2] * v[..., 2]
        degenerate = (u[..., 0] == 0) & (u[..., 1] == 0) & (u[..., 2] == 0)
        degenerate |= (v[..., 0] == 0) & (v[..., 1] == 0) & (v[..., 2] == 0)
    else:
        ux = (a[..., 0] - b[..., 0]) * aspect
        uy = a[..., 1] - b[..., 1]
        vx = (c[..., 0] - b[..., 0]) * aspect
        vy = c[..., 1] - b[..., 1]
        cross = np.abs(ux * vy - uy * vx)
        dot = ux * vx + uy * vy
        degenerate = ((ux == 0) & (uy == 0)) | ((vx == 0) & (vy == 0))
    ang = np.degrees(np.arctan2(cross, dot))
    ang[degenerate] = np.nan
    return ang, vis


def trunk_inclination(frames: np.ndarray, space: str, aspect: float) -> np.ndarray:
    """Trunk inclination per frame, degrees in [0, 180].

    The trunk is the vector from mid-shoulders to mid-hips; 0 means upright
    (hips straight below shoulders), 90 lying horizontal, 180 upside down (as a
    push-up filmed head-on appears in the image). NaN where not tracked. Used to
    reject "repetitions" that start and end in different postures, which is what
    getting into or out of position looks like.
    """
    s = frames[:, (L_SHOULDER, R_SHOULDER, L_HIP, R_HIP), :3].astype(np.float64)
    d = (s[:, 2] + s[:, 3]) - (s[:, 0] + s[:, 1])  # 2x the vector, scale-free
    if space == "world":
        horiz = np.sqrt(d[:, 0] * d[:, 0] + d[:, 2] * d[:, 2])
    else:
        horiz = np.abs(d[:, 0] * aspect)
    return np.degrees(np.arctan2(horiz, d[:, 1]))


def joint_triplets(joints: list[tuple[str, int]]) -> np.ndarray:
    """Stack (joint name, side index) pairs into a (k, 3) landmark index array.

    Raises KeyError for an unknown joint name and IndexError for a side other
    than 0 (left) or 1 (right).
    """
    return np.array([JOINTS[name][side] for name, side in joints], dtype=np.intp)
