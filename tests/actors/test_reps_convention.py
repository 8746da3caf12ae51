"""Angles as clinicians read them: the rep engine reports goniometric angles.

Sessions here are built from exact geometry, not the noisy generator, so the
expected values are known: a straight leg is 0° of knee flexion, a right angle
90°; an arm hanging at the side is 0° of shoulder abduction, horizontal 90°.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from actors.replay_metrics import recompute
from actors.reps import Rep, RepEngine
from actors.reps.angles import (
    L_ANKLE,
    L_ELBOW,
    L_HIP,
    L_KNEE,
    L_SHOULDER,
    L_WRIST,
    R_ANKLE,
    R_ELBOW,
    R_HIP,
    R_KNEE,
    R_SHOULDER,
    R_WRIST,
    joint_triplets,
    triplet_angles,
)
from storage.replay import ReplayWriter, read_replay

FPS = 30.0
THIGH = SHANK = 0.2     # frame heights
UPPER_ARM = 0.14
FOREARM = 0.12
# Every rep field that carries an angle's value (rather than a difference of two).
OLD_FIELDS = {"peak_deg", "trough_deg"}


def pose(knee: float = 180.0, arm: float = 0.0, elbow: float = 180.0) -> np.ndarray:
    """One frame (33, 4), both sides alike, in image coordinates (y down, square pixels).

    ``knee`` is the included hip-knee-ankle angle (the thigh leans forward and the
    shank back by the same amount, so the ankle stays under the hip); ``arm`` the
    angle between the upper arm and the vertical trunk, raised sideways (frontal
    plane); ``elbow`` the included shoulder-elbow-wrist angle, the forearm bending
    on in the same plane."""
    f = np.zeros((33, 4))
    f[:, :2] = 0.5, 0.15
    f[:, 3] = 1.0
    lean = math.radians((180.0 - knee) / 2.0)
    a = math.radians(arm)
    fore = a + math.radians(180.0 - elbow)
    for sign, (sh, el, wr, hp, kn, an) in ((1, (L_SHOULDER, L_ELBOW, L_WRIST, L_HIP, L_KNEE,
                                                L_ANKLE)),
                                           (-1, (R_SHOULDER, R_ELBOW, R_WRIST, R_HIP, R_KNEE,
                                                 R_ANKLE))):
        x = 0.5 + sign * 0.04
        f[sh, :2] = x, 0.30
        f[hp, :2] = x, 0.55       # straight above/below: the trunk's side line is vertical
        f[kn, :2] = f[hp, :2] + THIGH * np.array([math.sin(lean), math.cos(lean)])
        f[an, :2] = f[kn, :2] + SHANK * np.array([-math.sin(lean), math.cos(lean)])
        f[el, :2] = f[sh, :2] + UPPER_ARM * np.array([sign * math.sin(a), math.cos(a)])
        f[wr, :2] = f[el, :2] + FOREARM * np.array([sign * math.sin(fore), math.cos(fore)])
    return f


def session(values: list[tuple[float, float]], **fixed: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames moving one parameter of :func:`pose` through ``(value, seconds)`` waypoints,
    cosine-eased between them; the others held at ``fixed``."""
    (name,) = {"knee", "arm", "elbow"} - set(fixed)
    series = [values[0][0]]
    for (v0, _), (v1, secs) in zip(values, values[1:], strict=False):
        k = np.arange(1, int(round(secs * FPS)) + 1) / round(secs * FPS)
        series.extend(v0 + (v1 - v0) * (1 - np.cos(np.pi * k)) / 2)
    frames = np.stack([pose(**{name: float(v)}, **fixed) for v in series]).astype(np.float32)
    return np.arange(len(series)) * (1000.0 / FPS), frames


def cycles(rest: float, extreme: float, reps: int) -> list[tuple[float, float]]:
    """Rest 2 s, then ``reps`` times: out in 1.2 s, hold 0.3 s, back in 1.2 s, rest 1.5 s."""
    out = [(rest, 0.0), (rest, 2.0)]
    for _ in range(reps):
        out += [(extreme, 1.2), (extreme, 0.3), (rest, 1.2), (rest, 1.5)]
    return out


def run(kind: str | None, t_ms: np.ndarray, frames: np.ndarray) -> tuple[list[Rep], dict]:
    engine = RepEngine(kind, space="image", aspect=1.0)
    reps: list[Rep] = []
    for i in range(0, len(t_ms), 30):
        reps += engine.feed(t_ms[i:i + 30], frames[i:i + 30])
    reps += engine.finish()
    return reps, engine.summary()


def test_the_geometry_is_what_it_says() -> None:
    """The fixture's own check: its included angles are the ones asked for."""
    f = np.stack([pose(knee=90.0, arm=90.0, elbow=90.0), pose()])
    ang, _ = triplet_angles(f, joint_triplets([("knee", 0), ("shoulder", 1), ("elbow", 0),
                                               ("hip", 1)]), "image", 1.0)
    assert ang[0] == pytest.approx([90.0, 90.0, 90.0, 135.0], abs=1e-3)
    assert ang[1] == pytest.approx([180.0, 0.0, 180.0, 180.0], abs=1e-3)


@pytest.mark.parametrize(("included", "flexion"), [(180.0, 0.0), (135.0, 45.0), (90.0, 90.0)])
def test_conversion_per_joint(included: float, flexion: float) -> None:
    from actors.reps.clinical import JOINT_ANGLES, to_clinical

    for joint in ("knee", "elbow", "hip"):
        assert to_clinical(JOINT_ANGLES[joint], included) == pytest.approx(flexion)
    # the shoulder's included angle is already upper arm to trunk
    assert to_clinical(JOINT_ANGLES["shoulder"], 180.0 - included) == pytest.approx(flexion)
    series = np.array([included, np.nan])
    out = to_clinical(JOINT_ANGLES["knee"], series)
    assert out[0] == pytest.approx(flexion) and math.isnan(out[1])


def check_reps(reps: list[Rep], summary: dict, angle: str, lo: float, hi: float,
               tol: float = 0.5) -> None:
    assert len(reps) == 3
    assert summary["angle"] == angle and summary["angle_convention"] == "clinical"
    assert angle.split("_")[0] in summary["angle_label"]
    for r, d in zip(reps, summary["reps"], strict=True):
        assert r.to_dict() == d      # the packed log gives back the live records
        assert d["angle"] == angle
        assert not OLD_FIELDS & d.keys()
        assert d["angle_min_deg"] == pytest.approx(lo, abs=tol)
        assert d["angle_max_deg"] == pytest.approx(hi, abs=tol)
        # a difference of two angles: the same in both conventions
        assert d["angle_max_deg"] - d["angle_min_deg"] == pytest.approx(d["rom_deg"], abs=0.02)
    assert summary["angle_min_deg"] == min(d["angle_min_deg"] for d in summary["reps"])
    assert summary["angle_max_deg"] == max(d["angle_max_deg"] for d in summary["reps"])
    assert summary["rom_mean_deg"] == pytest.approx(hi - lo, abs=tol)
    assert json.loads(json.dumps(summary)) == summary


def test_squat_straight_leg_is_zero_and_a_right_angle_ninety() -> None:
    reps, summary = run("squat", *session(cycles(180.0, 90.0, 3), arm=0.0, elbow=180.0))
    check_reps(reps, summary, "knee_flexion", 0.0, 90.0)


def test_sit_to_stand_reads_seated_flexion_and_straight_standing() -> None:
    # direction +1 (the included angle opens): seated 90° of flexion, standing 0°
    reps, summary = run("sit_to_stand", *session(cycles(90.0, 180.0, 3), arm=0.0, elbow=180.0))
    check_reps(reps, summary, "knee_flexion", 0.0, 90.0)


def test_lateral_raise_arm_at_side_is_zero() -> None:
    reps, summary = run("lateral_raise", *session(cycles(0.0, 90.0, 3), knee=180.0,
                                                  elbow=180.0))
    check_reps(reps, summary, "shoulder_abduction", 0.0, 90.0)


def test_shoulder_flexion_is_named_for_its_plane() -> None:
    reps, summary = run("shoulder_flexion", *session(cycles(0.0, 120.0, 3), knee=180.0,
                                                     elbow=180.0))
    check_reps(reps, summary, "shoulder_flexion", 0.0, 120.0)


def test_curl_straight_arm_is_zero() -> None:
    reps, summary = run("bicep_curl", *session(cycles(180.0, 50.0, 3), knee=180.0, arm=0.0))
    check_reps(reps, summary, "elbow_flexion", 0.0, 130.0)


def test_fallback_reports_the_chosen_joints_angle() -> None:
    reps, summary = run(None, *session(cycles(180.0, 90.0, 3), arm=0.0, elbow=180.0))
    assert summary["fallback"] is True and summary["joint"] == "knee"
    check_reps(reps, summary, "knee_flexion", 0.0, 90.0)


def test_summary_before_any_repetition() -> None:
    _, summary = run("squat", *session([(180.0, 0.0), (180.0, 1.0)], arm=0.0, elbow=180.0))
    assert summary["angle"] == "knee_flexion" and summary["angle_convention"] == "clinical"
    assert summary["angle_min_deg"] is None and summary["angle_max_deg"] is None
    assert "joint_label" not in summary
    json.dumps(summary)


def test_replay_recompute_gives_the_live_summary() -> None:
    """What support staff recompute from the blob carries the same clinical angles."""
    t_ms, frames = session(cycles(180.0, 90.0, 3), arm=0.0, elbow=180.0)
    w = ReplayWriter(org_id="org-a", session_id="s-c", space="image", meta={
        "exercise": {"kind": "squat", "side": None, "target_reps": 3},
        "image_width": 720, "image_height": 720})
    w.append(t_ms, frames)
    replay = read_replay(w.finish())
    # the live actor feeds the engine exactly the frames the blob decodes to
    live = RepEngine("squat", space="image", aspect=1.0, target_reps=3)
    for i in range(0, len(replay.t_ms), 17):
        live.feed(replay.t_ms[i:i + 17], replay.frames[i:i + 17])
    live.finish()
    again = recompute(replay)["reps"]
    assert json.loads(json.dumps(again)) == live.summary()
    assert again["angle"] == "knee_flexion" and again["rep_count"] == 3
    assert again["angle_max_deg"] == pytest.approx(90.0, abs=2.0)
