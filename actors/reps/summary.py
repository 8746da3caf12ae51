"""Running per-session statistics over emitted repetitions, in O(1) state."""

from __future__ import annotations

import math

from .rep import Rep

# A gap between repetitions longer than this is a pause, not part of the set.
PAUSE_MS = 3000.0


class SessionStats:
    """Accumulates range-of-motion, angle, tempo, symmetry and activity figures.

    Uses running sums and Welford's update, so memory is constant however long
    the session is.
    """

    def __init__(self) -> None:
        self.n = 0
        self.rom_n = 0  # repetitions whose range was measured (Rep.has_rom)
        self.rom_sum = 0.0
        self.rom_min = math.inf
        self.rom_max = -math.inf
        # extremes of the reported (clinical) angle over counted repetitions
        self.angle_min = math.inf
        self.angle_max = -math.inf
        self.dur_mean = 0.0
        self.dur_m2 = 0.0
        self.sym_sum = 0.0
        self.sym_n = 0
        self.conf_sum = 0.0
        self.active_ms = 0.0
        self.last_end: float | None = None

    def add(self, rep: Rep) -> None:
        self.n += 1
        if rep.has_rom:
            self.rom_n += 1
            self.rom_sum += rep.rom_deg
            self.rom_min = min(self.rom_min, rep.rom_deg)
            self.rom_max = max(self.rom_max, rep.rom_deg)
        self.angle_min = min(self.angle_min, rep.angle_min_deg)
        self.angle_max = max(self.angle_max, rep.angle_max_deg)
        delta = rep.duration_ms - self.dur_mean
        self.dur_mean += delta / self.n
        self.dur_m2 += delta * (rep.duration_ms - self.dur_mean)
        if rep.symmetry is not None:
            self.sym_sum += rep.symmetry
            self.sym_n += 1
        self.conf_sum += rep.confidence
        self.active_ms += rep.duration_ms
        if self.last_end is not None:
            gap = rep.start_ms - self.last_end
            if 0.0 < gap <= PAUSE_MS:
                self.active_ms += gap
        self.last_end = rep.end_ms

    def as_dict(self, span_ms: float) -> dict:
        """Summary fields; None where undefined (no repetitions yet)."""
        n = self.n
        std = math.sqrt(self.dur_m2 / (n - 1)) if n > 1 else None
        cv = round(std / self.dur_mean, 3) if std is not None and self.dur_mean > 0 else None
        active = min(self.active_ms, span_ms)
        return {
            "rom_mean_deg": round(self.rom_sum / self.rom_n, 2) if self.rom_n else None,
            "rom_min_deg": round(self.rom_min, 2) if self.rom_n else None,
            "rom_max_deg": round(self.rom_max, 2) if self.rom_n else None,
            "angle_min_deg": round(self.angle_min, 2) if n else None,
            "angle_max_deg": round(self.angle_max, 2) if n else None,
            "tempo_mean_ms": round(self.dur_mean, 1) if n else None,
            "tempo_cv": cv,
            "cadence_per_min": round(60000.0 * n / active, 2) if n and active > 0 else None,
            "symmetry_mean": round(self.sym_sum / self.sym_n, 3) if self.sym_n else None,
            "symmetric_reps": self.sym_n,
            "confidence_mean": round(self.conf_sum / n, 3) if n else None,
            "session_ms": round(span_ms, 1),
            "active_ms": round(active, 1),
            "paused_ms": round(max(0.0, span_ms - active), 1),
        }
