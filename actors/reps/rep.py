"""The per-repetition record, built from one side's excursion or both sides' together."""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass

from .clinical import angle_for, clinical_range
from .detector import SideRep
from .profiles import Profile

# Both sides enter the averages and the symmetry figure only when the less
# visible one is at least this visible relative to the other; otherwise the
# occluded side's angles are largely MediaPipe's guess.
SYMMETRY_MIN_VIS_RATIO = 0.8
SYMMETRY_MIN_VIS = 0.6


@dataclass(frozen=True, slots=True)
class Rep:
    """One complete repetition. Times in ms since session start, angles in degrees.

    ``angle`` names the reported angle in the clinical convention (``clinical.py``:
    e.g. ``knee_flexion``, 0° with the leg straight); ``angle_min_deg`` and
    ``angle_max_deg`` are its smallest and largest value over the movement (rest
    position included; for a squat the standing and the deepest knee flexion);
    ``rom_deg`` is the excursion from rest, the same number in either convention.
    ``symmetry`` is min/max of the left and right range of motion (1 = equal),
    None unless both sides moved and were both reliably tracked.
    ``rom_left_deg``/``rom_right_deg`` are None for a side that did not move, or
    whose top went untracked (the repetition counted, its range is unknown); when
    no side's range is known ``rom_deg`` is the depth seen, a lower bound
    (``has_rom`` is False and the session's ROM figures leave it out).
    """

    index: int
    joint: str
    angle: str
    side: str
    start_ms: float
    end_ms: float
    duration_ms: float
    rom_deg: float
    angle_min_deg: float
    angle_max_deg: float
    concentric_ms: float
    eccentric_ms: float
    hold_ms: float
    rom_left_deg: float | None
    rom_right_deg: float | None
    symmetry: float | None
    mean_visibility: float
    coverage: float
    confidence: float

    @property
    def has_rom(self) -> bool:
        """True when the range of motion was measured on at least one side."""
        return self.rom_left_deg is not None or self.rom_right_deg is not None

    def to_dict(self) -> dict:
        """JSON-serialisable dict; floats rounded to what the measurement supports."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 1 if k.endswith("_ms") else 2 if k.endswith("_deg") else 3)
        return out


def _one(s: SideRep, direction: int) -> dict:
    if direction < 0:
        peak, trough = -s.base_x, -s.peak_x
    else:
        peak, trough = s.peak_x, s.base_x
    return {
        "start_ms": s.start_ms, "end_ms": s.end_ms, "rom_deg": s.rom_deg,
        "peak_deg": peak, "trough_deg": trough,
        "out_ms": max(0.0, s.peak_first_ms - s.start_ms),
        "hold_ms": max(0.0, s.peak_last_ms - s.peak_first_ms),
        "back_ms": max(0.0, s.end_ms - s.peak_last_ms),
        "mean_visibility": s.mean_vis, "coverage": s.coverage, "confidence": s.confidence,
    }


def build_rep(index: int, profile: Profile, sides: list[SideRep]) -> Rep:
    """Combine one or two side excursions (left first) into a Rep.

    With two sides, fields are visibility-weighted means when both were
    reliably tracked, else those of the better-tracked side alone.
    """
    measured = [s for s in sides if not s.hidden]
    if measured and len(measured) < len(sides):
        sides = measured  # a side whose top went untracked says nothing of the range
    parts = [_one(s, profile.direction) for s in sides]
    roms = {s.side: s.rom_deg for s in sides if not s.hidden}
    symmetry = None
    if len(sides) == 2:
        va, vb = sides[0].mean_vis, sides[1].mean_vis
        both_ok = min(va, vb) >= max(SYMMETRY_MIN_VIS, SYMMETRY_MIN_VIS_RATIO * max(va, vb))
        if both_ok:
            ra, rb = sides[0].rom_deg, sides[1].rom_deg
            # two hidden tops (one alone was dropped above): two lower bounds
            if max(ra, rb) > 0 and not sides[0].hidden:
                symmetry = min(ra, rb) / max(ra, rb)
            wa, wb = va / (va + vb), vb / (va + vb)
            merged = {k: wa * parts[0][k] + wb * parts[1][k] for k in parts[0]}
            merged["confidence"] = max(parts[0]["confidence"], parts[1]["confidence"])
            side = "both"
        else:
            best = 0 if va >= vb else 1
            merged = parts[best]
            side = sides[best].side
    else:
        merged = parts[0]
        side = sides[0].side
    out_ms, back_ms = merged["out_ms"], merged["back_ms"]
    # detection runs on the included angle; what is reported is the clinical one
    angle = angle_for(profile)
    angle_min, angle_max = clinical_range(angle, merged["peak_deg"], merged["trough_deg"])
    concentric, eccentric = (out_ms, back_ms) if profile.concentric_first else (back_ms, out_ms)
    return Rep(
        index=index, joint=profile.joint, angle=angle.name, side=side,
        start_ms=merged["start_ms"], end_ms=merged["end_ms"],
        duration_ms=merged["end_ms"] - merged["start_ms"],
        rom_deg=merged["rom_deg"], angle_min_deg=angle_min, angle_max_deg=angle_max,
        concentric_ms=concentric, eccentric_ms=eccentric, hold_ms=merged["hold_ms"],
        rom_left_deg=roms.get("left"), rom_right_deg=roms.get("right"), symmetry=symmetry,
        mean_visibility=merged["mean_visibility"], coverage=merged["coverage"],
        confidence=merged["confidence"],
    )


class RepLog:
    """The repetitions of a session, kept for its summary in 75 bytes each.

    A :class:`Rep` costs about 600 bytes of Python objects; a 30-minute session
    may count 600 of them, which alone would break the 100 KB-per-session memory
    budget. The summary only needs each rep's :meth:`Rep.to_dict`, whose values
    are rounded to 1-3 decimals, so those are packed: start and end times as
    float64 (they reach 10^7 ms), everything else as float32, which holds a value
    already rounded to 0.1 ms / 0.01 deg / 0.001 exactly enough that rounding it
    again gives the same number. ``None`` is stored as NaN (no rep value is NaN).
    """

    _FLOATS = ("duration_ms", "rom_deg", "angle_min_deg", "angle_max_deg", "concentric_ms",
               "eccentric_ms", "hold_ms", "rom_left_deg", "rom_right_deg", "symmetry",
               "mean_visibility", "coverage", "confidence")
    _PACK = struct.Struct(f"<IBBBdd{len(_FLOATS)}f")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._names: list[str] = []  # joint, angle and side names, by code
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, rep: Rep) -> None:
        d = rep.to_dict()
        nan = math.nan
        self._buf += self._PACK.pack(
            d["index"], self._code(d["joint"]), self._code(d["angle"]), self._code(d["side"]),
            d["start_ms"], d["end_ms"],
            *(nan if d[k] is None else d[k] for k in self._FLOATS))
        self._count += 1

    def dicts(self) -> list[dict]:
        """Each rep's :meth:`Rep.to_dict`, equal value for value."""
        out = []
        names = self._names
        for v in self._PACK.iter_unpack(self._buf):
            d = {"index": v[0], "joint": names[v[1]], "angle": names[v[2]],
                 "side": names[v[3]], "start_ms": v[4], "end_ms": v[5]}
            for k, x in zip(self._FLOATS, v[6:], strict=True):
                d[k] = None if x != x else round(x, _decimals(k))
            out.append(d)
        return out

    def _code(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            self._names.append(name)
            return len(self._names) - 1


def _decimals(key: str) -> int:
    """The rounding of :meth:`Rep.to_dict` for a field."""
    return 1 if key.endswith("_ms") else 2 if key.endswith("_deg") else 3
