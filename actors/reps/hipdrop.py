"""Lower-body repetitions filmed from the front: the hip's drop over the ankle.

Facing the camera (the usual home set-up: a laptop on a chair), the knee travels
toward the lens and the 2-D hip-knee-ankle angle moves only about 20 degrees in a
full squat, too little to count on. What a clinician reads off such a video is
the hip going down and up, measured against the patient's own leg. Two
per-frame features serve that, both element-wise so a frame's values never
depend on its batch:

- ``drop``: the hip's height over the lower ankle, per side, on a knee-angle-like
  scale (180 standing, about 90 at a 90-degree squat), normalised by the longest
  2-D thigh or shank length in the frame.
- the hip width and the trunk length in the image, from which ``ViewEstimate``
  judges how squarely the patient faces (or turns away from) the camera.

The detector (``detector.py``) counts on ``(1 - weight)`` times the knee angle
plus ``weight`` times the hip-drop angle, ``weight`` being 1 in front and rear
views (the hip drop alone: with the thigh along the camera axis the 2-D knee
angle is degenerate, a seated patient reads anywhere from 0 to 170 degrees) and
0 in side and oblique ones (where nothing changes); the range of motion it
reports stays the knee angle's. The view is judged from the body's layout, not from how much each
channel moves, because a split stance (lunge) lowers the hip at rest and would
fool a magnitude rule.
"""

from __future__ import annotations

import math

import numpy as np

from .angles import L_ANKLE, L_HIP, L_KNEE, L_SHOULDER, R_ANKLE, R_HIP, R_KNEE, R_SHOULDER

# hip width / upright trunk length: at or below FRONT_FROM the knee angle alone
# counts (0.33 at 35 degrees off facing the camera in the generator; 0.0-0.3 in
# the real side and rear-oblique clips), from FRONT_FULL the hip drop replaces it
# (within 20 degrees of facing the camera or turned away: 0.37-0.40, real
# front and rear clips 0.37-0.39)
FRONT_FROM, FRONT_FULL = 0.35, 0.37
VIEW_TAU_MS = 2000.0  # the view estimate's time constant: long against a repetition
VIEW_DT_MAX_MS = 100.0  # the most one upright frame stands for in the view estimate
# The trunk length the ratio is taken against is the trunk's upright length: a
# running maximum, so a forward lean (sitting down, a deep squat), which shortens
# the trunk in the image from the front, does not make a side view look frontal.
# It rises over TRUNK_RISE_MS (a tracking glitch of a few frames moves it little)
# and falls over TRUNK_FALL_MS (the patient stepping back from the camera).
TRUNK_RISE_MS = 300.0
TRUNK_FALL_MS = 20000.0
# A frame's ratio enters the view estimate clipped to this, so a glitch (a hip
# thrown across the image) moves it little; frames whose hips or shoulders are
# less visible than the detector's VIS_MIN do not enter it at all.
FRONTAL_CAP = 0.6
UPRIGHT_FRAC = 0.9  # of the upright trunk length: a frame that shows the patient upright

DROP_SCALE_DEG = 225.0  # hip_drop_angle's degrees per unit drop of height / (2 * segment)
_SIDES = ((L_HIP, L_KNEE, L_ANKLE), (R_HIP, R_KNEE, R_ANKLE))


def front_features(frames: np.ndarray, aspect: float, vis_min: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: each hip's height over the lower ankle (2, n), the longest leg
    segment, the hip width and the trunk length (n,) each, all in frame heights.

    ``frames`` is (n, 33, 4) in image coordinates; x is scaled by ``aspect``
    (width/height) so that lengths are in square units. NaN landmarks give NaN;
    so do the width and length where a hip or shoulder is less visible than
    ``vis_min``.
    """
    f = np.asarray(frames)
    x = f[:, :, 0].astype(np.float64) * aspect
    y = f[:, :, 1].astype(np.float64)
    # Against the floor (the lower ankle) and the longest leg segment in view: a
    # step lifts one foot and folds that leg away from the camera while the hips
    # hardly move; a squat lowers both hips over both feet. Whichever segment
    # points at the camera looks short (the thighs in a squat or seated, the
    # rear shank in a lunge), but never all four at once.
    floor = np.maximum(y[:, L_ANKLE], y[:, R_ANKLE])
    seg = np.maximum.reduce([np.hypot(x[:, a] - x[:, b], y[:, a] - y[:, b])
                             for hip, knee, ankle in _SIDES
                             for a, b in ((hip, knee), (knee, ankle))])
    height = np.stack([floor - y[:, L_HIP], floor - y[:, R_HIP]])
    hip_w = np.abs(x[:, L_HIP] - x[:, R_HIP])
    trunk = 0.5 * np.hypot(x[:, L_SHOULDER] + x[:, R_SHOULDER] - x[:, L_HIP] - x[:, R_HIP],
                           y[:, L_SHOULDER] + y[:, R_SHOULDER] - y[:, L_HIP] - y[:, R_HIP])
    seen = f[:, (L_HIP, R_HIP, L_SHOULDER, R_SHOULDER), 3].min(axis=1) >= vis_min
    hip_w[~seen] = np.nan
    trunk[~seen] = np.nan
    return height, seg, hip_w, trunk


def hip_drop_angle(height: float, seg: float) -> float:
    """The hip's height over the ankle on a knee-angle-like scale, in degrees.

    ``height`` is the hip's vertical height over the ankle and ``seg`` a leg
    segment's length in the same unit; their ratio is about 2 standing (thigh
    and shank about equally long). The scale is linear in the height, 180
    standing and DROP_SCALE_DEG lower per segment length of drop (divided by
    two), so that a squat's excursion is about the knee's (a 90-degree squat
    lowers the hip by about 0.4 of the leg: 90 "degrees"), and the profile's
    priors hold. Linear rather than the exact 2 * arcsin(height / (2 * seg)):
    that one is steepest standing, where it would blow tracking jitter up at
    rest. NaN in gives NaN (not tracked).
    """
    return 180.0 - DROP_SCALE_DEG * (1.0 - height / (2.0 * seg))


def front_weight(view: float) -> float:
    """How much the hip drop takes the knee angle's place (0 to 1) for a running
    frontal ratio ``view``."""
    w = (view - FRONT_FROM) / (FRONT_FULL - FRONT_FROM)
    return 0.0 if not w > 0.0 else (1.0 if w > 1.0 else w)


def _follow_max(ref: float, v: float, dt: float) -> float:
    """A running maximum that rises over TRUNK_RISE_MS and falls over TRUNK_FALL_MS."""
    return ref + (v - ref) * dt / ((TRUNK_RISE_MS if v > ref else TRUNK_FALL_MS) + dt)


class FrontView:
    """The hip drop and its weight for one session, frame by frame.

    State is a handful of floats carried from frame to frame, so a frame's
    values do not depend on how the stream was batched. The leg segment the hip
    height is measured in, and the trunk length the hip width is compared with,
    are both running maxima (``_follow_max``): the patient's own upright
    lengths, which neither a squat's foreshortened thigh nor a forward lean
    shortens. The view is the plain mean of the first ratios, then a running
    mean over VIEW_TAU_MS, so that no single frame decides and the view is
    known from the first second.
    """

    __slots__ = ("t_last", "t_view", "trunk", "view", "n", "t_seg", "seg", "s1", "s2")

    def __init__(self) -> None:
        self.t_last = self.t_seg = -math.inf
        self.t_view = -math.inf
        self.trunk = self.view = self.seg = self.s1 = self.s2 = math.nan
        self.n = 0

    def update(self, ts: list[float], height: list[list[float]], seg: list[float],
               hip_w: list[float], trunk: list[float]
               ) -> tuple[list[float], list[float], list[float]]:
        """Per frame: the hip-drop angle of the left and right side, and its weight
        (``front_weight`` of the view so far)."""
        left, right = [], []
        t_seg, ref_seg, s1, s2 = self.t_seg, self.seg, self.s1, self.s2
        for t, hl, hr, sg in zip(ts, height[0], height[1], seg, strict=True):
            if sg == sg and sg > 0.0:
                # median of three first: a single-frame glitch of a knee or ankle
                # must not stretch the leg for the seconds the maximum takes to fall
                if s1 != s1:
                    med = s1 = s2 = sg
                else:
                    med = (s1 if sg < s1 else (s2 if sg > s2 else sg)) if s1 <= s2 else \
                        (s2 if sg < s2 else (s1 if sg > s1 else sg))
                s2, s1 = s1, sg
                ref_seg = med if ref_seg != ref_seg else _follow_max(ref_seg, med, t - t_seg)
                t_seg = t
            left.append(hip_drop_angle(hl, ref_seg))
            right.append(hip_drop_angle(hr, ref_seg))
        self.t_seg, self.seg, self.s1, self.s2 = t_seg, ref_seg, s1, s2
        out = []
        t_last, t_view, ref, view, n = self.t_last, self.t_view, self.trunk, self.view, self.n
        for t, hw, tr in zip(ts, hip_w, trunk, strict=True):
            if hw == hw and tr == tr and tr > 0.0:  # hips and shoulders seen
                ref = tr if ref != ref else _follow_max(ref, tr, t - t_last)
                t_last = t
                # upright frames only: seated or leaning, the hips are further from
                # the camera than the shoulders were when the trunk was longest
                if tr >= UPRIGHT_FRAC * ref:
                    r = hw / ref
                    if r > FRONTAL_CAP:
                        r = FRONTAL_CAP
                    n += 1
                    if n == 1:
                        view = r
                    else:
                        # the time this frame stands for, not the gap since the
                        # last upright one: after sitting for seconds, the first
                        # frame up (often still half-risen) would weigh as much
                        dt = min(t - t_view, VIEW_DT_MAX_MS)
                        view += (r - view) * max(dt / (VIEW_TAU_MS + dt), 1.0 / n)
                    t_view = t
            out.append(front_weight(view) if n else 0.0)
        self.t_last, self.t_view, self.trunk, self.view, self.n = t_last, t_view, ref, view, n
        return left, right, out
