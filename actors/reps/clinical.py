"""Joint angles as clinicians read them (goniometric convention).

The engine measures each joint's *included* angle: the angle at landmark b between
the segments b->a and b->c of ``angles.JOINTS`` (0-180°, unsigned). That is what
detection runs on, and it is what a protractor laid on the limb reads, but not what
a clinician writes down: in goniometry knee, elbow and hip flexion are 0° with the
limb straight, and shoulder flexion and abduction are 0° with the arm at the side.
Everything the engine *reports* (repetition records, the session summary, the
plot) is converted here; detection and range of motion are untouched, because the
conversion is ``clinical = offset + sign * included`` with ``sign`` = ±1, so a
difference of two angles (the range of motion) is the same number in both
conventions.

Per joint (included angle from ``angles.JOINTS``):

========  =======================  =======================  ==================
joint     included angle at b       clinical angle           formula
========  =======================  =======================  ==================
knee      hip-knee-ankle           knee flexion             180° − included
elbow     shoulder-elbow-wrist     elbow flexion            180° − included
hip       shoulder-hip-knee        hip flexion / abduction  180° − included
shoulder  hip-shoulder-elbow       shoulder flexion /       included
                                   abduction (elevation)
========  =======================  =======================  ==================

The shoulder's included angle is already the clinical one: it is the angle between
the upper arm (shoulder->elbow) and the trunk's side (shoulder->hip), 0° with the
arm hanging along the trunk, 90° horizontal, 180° overhead. The hip's is measured
against the trunk's side line rather than the pelvis, so 180° − included equals hip
flexion (sagittal) or abduction (frontal) with the trunk upright.

Limits: the included angle is unsigned, so hyperextension past straight reads as a
small positive flexion (a knee hyperextended by 5° reads 5°), and shoulder extension
behind the trunk reads as a small positive elevation. A 2-D image-space angle is
also foreshortened for movement out of the image plane, in either convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .profiles import Profile

CONVENTION = "clinical"


@dataclass(frozen=True, slots=True)
class ClinicalAngle:
    """One reported angle: ``value = offset + sign * included angle`` (degrees)."""

    name: str      # field value, e.g. "knee_flexion"
    label: str     # for people: plot axis, summary
    formula: str   # how it comes from the landmarks
    offset: float
    sign: float


_FLEXION = 180.0, -1.0
_DIRECT = 0.0, 1.0

# joint -> the angle reported when the exercise does not say which plane it moves in
# (the engine's fallback mode, and profiles of sagittal movements)
JOINT_ANGLES: dict[str, ClinicalAngle] = {
    "knee": ClinicalAngle("knee_flexion", "knee flexion (0° = leg straight)",
                          "180° − hip-knee-ankle angle", *_FLEXION),
    "elbow": ClinicalAngle("elbow_flexion", "elbow flexion (0° = arm straight)",
                           "180° − shoulder-elbow-wrist angle", *_FLEXION),
    "hip": ClinicalAngle("hip_flexion", "hip flexion (0° = standing straight)",
                         "180° − shoulder-hip-knee angle", *_FLEXION),
    # plane unknown: flexion and abduction read on the same angle, so the plane-free
    # clinical name for it (humeral elevation)
    "shoulder": ClinicalAngle("shoulder_elevation", "shoulder elevation (0° = arm at side)",
                              "hip-shoulder-elbow angle (upper arm to trunk)", *_DIRECT),
}

# profile kind -> the angle when the profile fixes the plane of movement
_PROFILE_ANGLES: dict[str, ClinicalAngle] = {
    "hip_abduction": ClinicalAngle("hip_abduction", "hip abduction (0° = standing straight)",
                                   "180° − shoulder-hip-knee angle", *_FLEXION),
    "lateral_raise": ClinicalAngle("shoulder_abduction",
                                   "shoulder abduction (0° = arm at side)",
                                   "hip-shoulder-elbow angle (upper arm to trunk)", *_DIRECT),
    "shoulder_flexion": ClinicalAngle("shoulder_flexion", "shoulder flexion (0° = arm at side)",
                                      "hip-shoulder-elbow angle (upper arm to trunk)",
                                      *_DIRECT),
}


def angle_for(profile: Profile) -> ClinicalAngle:
    """The angle reported for ``profile``: its kind's when the kind fixes the plane of
    movement, else its joint's (so the fallback's ``auto:*`` profiles get the joint's)."""
    return _PROFILE_ANGLES.get(profile.kind) or JOINT_ANGLES[profile.joint]


_A = TypeVar("_A", float, np.ndarray)


def to_clinical(angle: ClinicalAngle, included: _A) -> _A:
    """The clinical value of an included angle (a float or an array, NaN stays NaN)."""
    return angle.offset + angle.sign * included


def clinical_range(angle: ClinicalAngle, a: float, b: float) -> tuple[float, float]:
    """Two included angles (a movement's two ends) as (smallest, largest) clinical value."""
    x, y = to_clinical(angle, a), to_clinical(angle, b)
    return (x, y) if x <= y else (y, x)
