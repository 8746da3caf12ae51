"""One joint followed on one or both sides, with left/right excursions paired up.

Both sides are detected independently. Excursions that overlap in time are the
same repetition done with both limbs (squat, push-up, two-arm raise) and are
merged into one; excursions that do not overlap are separate repetitions
(alternating curls, one leg at a time). Pairing runs on time-stamped detector
events replayed in time order, so the outcome does not depend on how frames
were split into batches.
"""

from __future__ import annotations

from .detector import DEPTH_FRAC, DONE, ENTER, RETURN_TIMEOUT_MS, SideDetector, SideRep
from .profiles import Profile

# How long a finished excursion waits for the other side, which is still in an
# excursion, to finish the same movement. Covers the other side's own return
# timeout plus some lag.
PAIR_WAIT_MS = RETURN_TIMEOUT_MS + 1000.0
OVERLAP_MIN = 0.5
# A one-sided excursion smaller than this share of the other side's typical range
# is not a repetition: when one limb works through its range, the other one's
# small wobble is noise (the standing leg in hip abduction).
CROSS_MIN = 0.5


def _overlap(a: SideRep, b: SideRep) -> bool:
    """True when the two excursions share at least OVERLAP_MIN of the shorter one."""
    inter = min(a.end_ms, b.end_ms) - max(a.start_ms, b.start_ms)
    shorter = min(a.end_ms - a.start_ms, b.end_ms - b.start_ms)
    return inter > 0 and inter >= OVERLAP_MIN * shorter


def _shallower(first: list[SideRep], nxt: list[SideRep]) -> bool:
    """True when ``first`` went less than DEPTH_FRAC as far as ``nxt`` on every side
    the two share (on the counted channel), or, sharing none, on their deepest."""
    depth = {s.side: s.depth for s in nxt}
    shared = [(s.depth, depth[s.side]) for s in first if s.side in depth]
    if not shared:
        shared = [(max(s.depth for s in first), max(depth.values()))]
    return all(a < DEPTH_FRAC * b for a, b in shared)


class JointTracker:
    """Detectors for ``profile.joint`` on the given sides (0 = left, 1 = right).

    ``feed`` returns the repetitions completed so far as ``(t_emit_ms, [SideRep,
    ...])`` with sides in left, right order. ``t_emit_ms`` is the stream time
    at which the repetition became final; it does not depend on batching.
    """

    def __init__(self, profile: Profile, sides: tuple[int, ...], *,
                 candidate: bool = False) -> None:
        """``candidate``: one of the fallback's candidates, which race to lock on
        (``engine.RepEngine``): their first repetitions are not held back (that
        would only delay the lock) and their rest does not follow the limb."""
        self.profile = profile
        self.sides = sides
        names = ("left", "right")
        self.dets = [SideDetector(profile, names[s], refined=not candidate)
                     for s in sides]
        self._active: list[float | None] = [None, None]
        self._pending: list[SideRep | None] = [None, None]
        self._last_single: tuple[int, SideRep] | None = None
        self._typ = [0.0, 0.0]
        self._seq = 0
        # the first repetition, until the second confirms it (see _confirm)
        self._first: tuple[float, list[SideRep]] | None = None
        self._confirmed = candidate

    def feed(self, per_side: list[tuple[list, list, list, list]], t_end: float) -> list:
        """Process one batch; ``per_side[i]`` holds the lists for ``self.sides[i]``."""
        if len(self.dets) == 1:
            ev = self.dets[0].process(*per_side[0])
            return self._confirm([(e[0], [e[2]]) for e in ev if e[1] == DONE and e[2].counted])
        events = []
        for i, det in enumerate(self.dets):
            for e in det.process(*per_side[i]):
                events.append((e[0], i, self._next(), e[1], e[2]))
        return self._confirm(self._replay(events, t_end))

    def flush(self, t_end: float) -> list:
        """End of stream: finish returning excursions and release anything waiting,
        the first repetition too if nothing came to confirm it."""
        if len(self.dets) == 1:
            out = [(e[0], [e[2]]) for e in self.dets[0].flush() if e[2].counted]
        else:
            events = [(e[0], i, self._next(), e[1], e[2])
                      for i, det in enumerate(self.dets) for e in det.flush()]
            out = self._replay(events, t_end)
            for i in (0, 1):
                rep = self._pending[i]
                if rep is not None:
                    self._pending[i] = None
                    self._single(i, rep, t_end, out)
        out = self._confirm(out)
        if self._first is not None:
            out.insert(0, self._first)
            self._first = None
        return out

    def _confirm(self, out: list) -> list:
        """Hold the first repetition back until the second one ends, then judge it
        by the rule every later one meets: deeper than DEPTH_FRAC of the patient's
        range, now known from the second. The first is otherwise judged against
        the profile's prior alone, so a partial repetition or a shallow adjustment
        before the set (picking up a weight) would count whenever the patient's
        range is above the prior's. Each side's detector, on its own second
        repetition, likewise lets that one set its typical range when its first
        was shallower (``SideDetector._rep``), in stream time.
        """
        if self._confirmed or not out:
            return out
        if self._first is None:
            self._first, out = out[0], out[1:]
            if not out:
                return out
        first, nxt = self._first, out[0]
        self._first, self._confirmed = None, True
        return out if _shallower(first[1], nxt[1]) else [first, *out]

    def _single(self, i: int, rep: SideRep, t: float, out: list) -> None:
        other = self._typ[1 - i]
        # A one-sided movement this small against the other side's range is the
        # other leg's wobble, even if its top went untracked (its range is then a
        # lower bound: a real one may be lost, a wobble is not counted).
        if other > 0.0 and rep.rom_deg < CROSS_MIN * other:
            return
        if not rep.hidden:  # a lower bound is not the side's typical range
            self._learn(i, rep.rom_deg)
        out.append((t, [rep]))
        self._last_single = (i, rep)

    def _learn(self, i: int, rom: float) -> None:
        typ = self._typ[i]
        self._typ[i] = rom if typ == 0.0 else typ + 0.25 * (rom - typ)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _release_due(self, now: float, out: list, inclusive: bool) -> None:
        for i in (0, 1):
            rep = self._pending[i]
            if rep is None:
                continue
            due = rep.done_ms + PAIR_WAIT_MS
            if due < now or (inclusive and due <= now):
                self._pending[i] = None
                self._single(i, rep, due, out)

    def _replay(self, events: list, t_end: float) -> list:
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        out: list = []
        for t, i, _seq, kind, payload in events:
            self._release_due(t, out, inclusive=False)
            o = 1 - i
            if kind == ENTER:
                self._active[i] = payload
                continue
            self._active[i] = None
            rep: SideRep = payload
            own = self._pending[i]
            if own is not None:
                # a newer excursion on the same side: the older one found no partner
                self._pending[i] = None
                self._single(i, own, t, out)
            other = self._pending[o]
            if other is not None:
                self._pending[o] = None
                if rep.counted and _overlap(rep, other):
                    pair = [other, rep] if o == 0 else [rep, other]
                    for k in (0, 1):
                        if not pair[k].hidden:
                            self._learn(k, pair[k].rom_deg)
                    out.append((t, pair))
                    self._last_single = None
                    continue
                self._single(o, other, t, out)
            if not rep.counted:
                continue
            start_o = self._active[o]
            if start_o is not None and start_o < rep.end_ms:
                self._pending[i] = rep
                continue
            last = self._last_single
            if last is not None and last[0] == o and _overlap(rep, last[1]):
                # the other side already reported this movement on its own
                continue
            self._single(i, rep, t, out)
        self._release_due(t_end, out, inclusive=True)
        return out
