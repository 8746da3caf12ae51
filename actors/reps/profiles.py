"""Exercise profiles: which joint angle defines a repetition and how it moves.

Priors here (typical range of motion, minimum duration) are only used until the
patient's own range is known: detection thresholds adapt to the measured range
after the first counted repetition (see ``detector.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .angles import JOINTS


@dataclass(frozen=True)
class Profile:
    """How one exercise kind is detected.

    ``direction`` is -1 when a repetition decreases the angle away from the rest
    position (flexion: squat, curl, push-up) and +1 when it increases it
    (raises, sit-to-stand from seated, shoulder press from the shoulders).
    ``hips_still`` marks exercises done standing in place without the hips
    travelling: hips moving across the image then means walking, not exercise.
    ``hip_drop`` marks lower-body exercises whose repetitions lower and raise the
    hips: filmed from the front they are counted on the hip's drop (``hipdrop.py``).
    """

    kind: str
    joint: str
    direction: int
    rom_prior_deg: float
    min_rep_ms: float
    max_rep_ms: float
    concentric_first: bool
    rest: str
    description: str
    aliases: tuple[str, ...] = ()
    hips_still: bool = False
    hip_drop: bool = False

    def __post_init__(self) -> None:
        if self.joint not in JOINTS:
            raise ValueError(f"unknown joint {self.joint!r}")
        if self.direction not in (-1, 1):
            raise ValueError("direction must be -1 or +1")
        if not (self.rom_prior_deg > 0 and 0 < self.min_rep_ms < self.max_rep_ms):
            raise ValueError("priors must be positive and min_rep_ms < max_rep_ms")



def _profile(kind: str, joint: str, direction: int, rom: float, min_ms: float,
             concentric_first: bool, rest: str, description: str, aliases: tuple[str, ...],
             hips_still: bool = False, max_ms: float = 12000.0,
             hip_drop: bool = False) -> Profile:
    return Profile(kind, joint, direction, rom, min_ms, max_ms, concentric_first, rest,
                   description, aliases, hips_still, hip_drop)


# kind, joint, direction, typical patient ROM (deg), minimum rep duration (ms), ...
PROFILES: dict[str, Profile] = {p.kind: p for p in (
    _profile("squat", "knee", -1, 80.0, 1000.0, False, "standing",
             "knee flexion; down then up", ("squats", "bodyweight_squat", "mini_squat"),
             hip_drop=True),
    _profile("lunge", "knee", -1, 70.0, 1000.0, False, "split stance",
             "knee flexion of both legs; down then up", ("lunges", "split_squat"),
             hip_drop=True),
    _profile("sit_to_stand", "knee", 1, 70.0, 1200.0, True, "seated",
             "knee extension from seated to standing and back",
             ("sit_stand", "sts", "chair_stand", "sit_to_stands"), max_ms=15000.0,
             hip_drop=True),
    _profile("hip_abduction", "hip", -1, 25.0, 600.0, True, "standing",
             "leg raised sideways (the trunk-thigh angle opens); one side at a time",
             ("standing_hip_abduction", "side_leg_raise", "hip_abductions"), hips_still=True),
    _profile("lateral_raise", "shoulder", 1, 70.0, 600.0, True, "arms down",
             "shoulder abduction, arms raised sideways", ("lateral_raises", "side_raise"),
             hips_still=True),
    _profile("shoulder_flexion", "shoulder", 1, 90.0, 700.0, True, "arms down",
             "arm raised forward", ("front_raise", "arm_raise", "shoulder_raise"),
             hips_still=True),
    _profile("bicep_curl", "elbow", -1, 90.0, 600.0, True, "arms extended",
             "elbow flexion", ("biceps_curl", "curl", "curls", "bicep_curls", "elbow_flexion"),
             hips_still=True),
    _profile("shoulder_press", "elbow", 1, 70.0, 600.0, True, "hands at shoulders",
             "elbow extension pressing overhead", ("overhead_press", "military_press"),
             hips_still=True),
    _profile("push_up", "elbow", -1, 60.0, 400.0, False, "arms extended (plank)",
             "elbow flexion lowering the body", ("pushup", "pushups", "press_up", "push_ups")),
)}

_ALIASES: dict[str, str] = {}
for _prof in PROFILES.values():
    _ALIASES[_prof.kind] = _prof.kind
    for _alias in _prof.aliases:
        _ALIASES[_alias] = _prof.kind

# Fallback candidates: every joint in both directions, because for an unknown
# exercise the rest position (flexed or extended) is unknown too.
# joint -> (prior ROM, minimum rep duration): legs move slower than arms, and a
# stride's knee or hip swing must not pass for a repetition
FALLBACK_PRIORS = {"elbow": (70.0, 500.0), "shoulder": (60.0, 500.0), "hip": (50.0, 1000.0),
                   "knee": (60.0, 1000.0)}


def fallback_profiles() -> list[Profile]:
    """Generic profiles tried when the kind is unknown, one per joint and direction."""
    out = []
    for joint, (prior, min_ms) in FALLBACK_PRIORS.items():
        for direction in (-1, 1):
            out.append(Profile(
                kind=f"auto:{joint}:{'flexion' if direction < 0 else 'extension'}",
                joint=joint, direction=direction, rom_prior_deg=prior,
                min_rep_ms=min_ms, max_rep_ms=12000.0,
                # without a profile the phase labels follow the usual case:
                # lowering against gravity first for flexion-defined exercises
                concentric_first=direction > 0, rest="unknown",
                description="fallback: joint with the largest periodic motion"))
    return out


def normalise_kind(kind: str) -> str:
    """Lower-case, with runs of spaces, dashes and dots turned into underscores."""
    return re.sub(r"[\s\-.]+", "_", kind.strip().lower()).strip("_")


def profile_for(kind: str | None) -> Profile | None:
    """The profile for an exercise kind, accepting aliases ("push-up", "Squats").

    Returns None for None, an empty string, a non-string, or an unknown kind;
    the engine then falls back to picking the joint with the largest periodic
    motion.
    """
    if not isinstance(kind, str) or not kind.strip():
        return None
    name = _ALIASES.get(normalise_kind(kind))
    return PROFILES[name] if name else None
