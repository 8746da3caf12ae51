"""The spool's index: where every key's records are in the shared segments.

Built at start-up by scanning every segment (:func:`scan`), then kept in memory by
the committer (:meth:`Index.apply` after each round, :meth:`Index.apply_upkeep`
after a compaction). It is owned by the event loop; worker threads get copies.

**Order and removal.** Every record carries its key, the key's *generation* and
a *sequence number* within it. ``remove`` writes a tombstone "generations <= g of
this key are removed" and the key's next records use generation g + 1. At start-up
a key's live records are those of its current generation (its highest tombstone
+ 1, or 0), ordered by sequence number, each number once. So a key's order does
not depend on where its records sit: a compaction may copy them to a later
segment (a crash between the copy and the deletion of the old segment leaves two
equal copies, read once), and a tombstone may be copied forward.

**Deleting segments (compaction).** A segment is deleted once none of its records
is live. Its tombstones are copied forward first if the key still has records in
another segment (else that key's old records would come back at the next start).
To bound the disk, the committer compacts between rounds (:meth:`Index.upkeep`):
a closed segment less than half live has its live records copied to the active
segment and is then deleted; past 3/4 of the budget any closed segment with dead
records is, and the active segment is closed early if half of it is dead. Closed
segments are at least half live, so the disk holds at most about twice the live
data plus the active segment. A step copies at most about ``COPY_STEP`` (4 MiB, or one
key's records in the segment if more), so a round never waits behind a long copy; a
segment is deleted at the step that moves its last live records.
(Under pressure a segment is compacted only if at least 1/8 of it is dead, so a
budget full of live data is not copied round after round.)

**Old-layout logs** (``org/session.log``) are generation 0 of their key: a key
with a tombstone and such a log is one whose removal a crash cut short between
the tombstone and the deletion of the log; start-up finishes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from storage.spool_files import KeyResult, SegmentFile, rollback
from storage.spool_format import read_seg_one

log = logging.getLogger("telemetry.spool")

SEG_DIR = ".segments"
SEG_SUFFIX = ".seg"
SHIFT = 40  # a position is sid << SHIFT | offset
COPY_STEP = 4 * 1024 * 1024  # live bytes a compaction step copies (at least one key's)


@dataclass(eq=False)
class Segment:
    sid: int
    path: Path
    size: int = 0  # bytes of intact records
    live: int = 0  # bytes of live records
    keys: dict[str, int] = field(default_factory=dict)  # live records per key
    touched: set[str] = field(default_factory=set)  # keys with any record or tombstone here
    tombs: dict[str, int] = field(default_factory=dict)  # highest removed generation per key


@dataclass(eq=False)
class KeyIndex:
    gen: int = 0
    next_seq: int = 0
    pos: array[int] = field(default_factory=lambda: array("Q"))  # live records, in order
    segs: dict[int, int] = field(default_factory=dict)  # live bytes per segment
    touched: set[int] = field(default_factory=set)  # segments with anything of this key
    legacy: int | None = None  # size of its log of the old layout, if any

    @property
    def has_log(self) -> bool:
        return bool(self.pos) or self.legacy is not None


@dataclass
class Upkeep:
    """A compaction step, planned on the event loop, done in a worker thread."""

    copy: list[tuple[str, list[int]]] = field(default_factory=list)  # (key, positions)
    copy_from: int | None = None
    delete: list[Segment] = field(default_factory=list)
    carry: list[tuple[str, int]] = field(default_factory=list)  # tombstones to copy forward
    close_active: bool = False
    # results, filled in by the thread
    moved: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    carried: list[tuple[str, int, int]] = field(default_factory=list)  # (key, gen, sid)
    deleted: list[int] = field(default_factory=list)


class Index:
    """Segments and keys; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seg_dir = root / SEG_DIR
        self.segs: dict[int, Segment] = {}
        self.keys: dict[str, KeyIndex] = {}
        self.active: SegmentFile | None = None
        self.next_sid = 1
        self.seg_bytes = 0
        self.legacy_bytes = 0
        self.torn_tails = self.torn_bytes = 0

    @property
    def disk_bytes(self) -> int:
        return self.seg_bytes + self.legacy_bytes

    @property
    def live_bytes(self) -> int:
        return sum(s.live for s in self.segs.values()) + self.legacy_bytes

    def log_keys(self) -> list[str]:
        return sorted(k for k, ki in self.keys.items() if ki.has_log)

    def count_logs(self) -> int:
        return sum(1 for ki in self.keys.values() if ki.has_log)

    def segment(self, sid: int) -> Segment:
        seg = self.segs.get(sid)
        if seg is None:
            seg = self.segs[sid] = Segment(sid, self.seg_dir / f"{sid:012d}{SEG_SUFFIX}")
            self.next_sid = max(self.next_sid, sid + 1)
        return seg

    def set_legacy(self, key: str, size: int | None) -> None:
        ki = self.keys.setdefault(key, KeyIndex())
        self.legacy_bytes += (size or 0) - (ki.legacy or 0)
        ki.legacy = size
        self._forget_if_empty(key, ki)

    # -- after a round -----------------------------------------------------------------

    def written(self, segs: list[SegmentFile], touched: set[tuple[str, int]]) -> None:
        """Sizes of the segments a thread wrote to; which keys wrote to which (even
        what failed may be there, and a removal must know it)."""
        for sf in segs:
            seg = self.segment(sf.sid)
            self.seg_bytes += sf.size - seg.size
            seg.size = sf.size
        for key, sid in touched:
            self.segment(sid).touched.add(key)
            self.keys.setdefault(key, KeyIndex()).touched.add(sid)

    def apply(self, key: str, res: KeyResult) -> None:
        """What a round did to ``key`` (after :meth:`written`)."""
        ki = self.keys.setdefault(key, KeyIndex())
        if res.removed:
            self._kill(key, ki)
        if ki.legacy is not None and not res.legacy:
            self.legacy_bytes -= ki.legacy
            ki.legacy = None
        for sid, gen in res.tombs:
            seg = self.segment(sid)
            seg.tombs[key] = max(gen, seg.tombs.get(key, -1))
            seg.touched.add(key)
            ki.touched.add(sid)
        for sid, off, size in res.written:
            self._add(key, ki, sid, off, size)
        ki.gen, ki.next_seq = res.gen, res.next_seq
        self._forget_if_empty(key, ki)

    def _add(self, key: str, ki: KeyIndex, sid: int, off: int, size: int) -> None:
        seg = self.segment(sid)
        ki.pos.append(sid << SHIFT | off)
        ki.segs[sid] = ki.segs.get(sid, 0) + size
        ki.touched.add(sid)
        seg.live += size
        seg.keys[key] = seg.keys.get(key, 0) + 1
        seg.touched.add(key)

    def _kill(self, key: str, ki: KeyIndex) -> None:
        for sid, size in ki.segs.items():
            seg = self.segs[sid]
            seg.live -= size
            seg.keys.pop(key, None)
        ki.pos, ki.segs = array("Q"), {}

    def _forget_if_empty(self, key: str, ki: KeyIndex) -> None:
        # Nothing of the key left anywhere: its generation may start over at 0.
        if not ki.touched and not ki.has_log and self.keys.get(key) is ki:
            del self.keys[key]

    # -- compaction ----------------------------------------------------------------------

    def upkeep(self, max_bytes: int, busy: bool) -> Upkeep | None:
        """The next compaction step, or None if there is nothing to do (or reads
        are in progress: ``busy``)."""
        if busy:
            return None
        act = self.active.sid if self.active is not None else None
        closed = [s for s in self.segs.values() if s.sid != act]
        plan = Upkeep(delete=[s for s in closed if s.live == 0])
        pressed = self.disk_bytes > max_bytes * 3 // 4
        worth = [s for s in closed if 0 < s.live and (
            s.live * 2 < s.size or (pressed and (s.size - s.live) * 8 >= s.size))]
        if worth:
            src = max(worth, key=lambda s: s.size - s.live)
            plan.copy_from = src.sid
            budget = 0
            for k in sorted(src.keys, key=lambda k: self.keys[k].segs.get(src.sid, 0)):
                if plan.copy and budget >= COPY_STEP:
                    break  # the rest at the next steps: a round waits for this one
                plan.copy.append((k, [p for p in self.keys[k].pos if p >> SHIFT == src.sid]))
                budget += self.keys[k].segs.get(src.sid, 0)
            if len(plan.copy) == len(src.keys):
                plan.delete.append(src)
        act_seg = self.segs.get(act) if act is not None else None
        if pressed and act_seg is not None and act_seg.size > 0 \
                and act_seg.live * 2 <= act_seg.size:
            plan.close_active = True  # compacted at the next step
        gone = {s.sid for s in plan.delete}
        for seg in plan.delete:
            for key, gen in seg.tombs.items():
                ki = self.keys.get(key)
                # needed while the key has records elsewhere (older generations to
                # hide, or its live ones whose generation it defines)
                if ki is not None and (ki.pos or ki.touched - gone):
                    plan.carry.append((key, gen))
        if not plan.delete and not plan.close_active and not plan.copy:
            return None
        return plan

    def apply_upkeep(self, plan: Upkeep) -> None:
        for key, moved in plan.moved.items():
            ki = self.keys[key]
            old = {p for p in ki.pos if p >> SHIFT == plan.copy_from}
            new = iter(moved)
            pos = array("Q")
            for p in ki.pos:
                if p in old:
                    sid, off, size = next(new)
                    pos.append(sid << SHIFT | off)
                    ki.segs[sid] = ki.segs.get(sid, 0) + size
                    ki.touched.add(sid)
                    seg = self.segment(sid)
                    seg.live += size
                    seg.keys[key] = seg.keys.get(key, 0) + 1
                    seg.touched.add(key)
                else:
                    pos.append(p)
            ki.pos = pos
            src = self.segs[plan.copy_from]  # type: ignore[index]
            src.live -= ki.segs.pop(plan.copy_from, 0)  # type: ignore[arg-type]
            src.keys.pop(key, None)
        for key, gen, sid in plan.carried:
            seg = self.segment(sid)
            seg.tombs[key] = max(gen, seg.tombs.get(key, -1))
            seg.touched.add(key)
            self.keys[key].touched.add(sid)
        for sid in plan.deleted:
            seg = self.segs.pop(sid)
            self.seg_bytes -= seg.size
            for key in seg.touched:
                ki = self.keys.get(key)
                if ki is not None:
                    ki.touched.discard(sid)
                    ki.segs.pop(sid, None)
                    self._forget_if_empty(key, ki)


def segment_ids(seg_dir: Path) -> list[int]:
    ids = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(seg_dir):
            stem = name[: -len(SEG_SUFFIX)]
            if name.endswith(SEG_SUFFIX) and stem.isdigit():
                ids.append(int(stem))
    return sorted(ids)


def scan(root: Path, *, cut: bool) -> Index:
    """Blocking: the index of every segment under ``root``. With ``cut`` (the
    owner, at start-up) a torn or corrupt tail is cut off (truncate + fsync) and
    counted; without, reading just stops there (another process may be writing)."""
    idx = Index(root)
    tombs: dict[str, int] = {}
    found: dict[str, list[tuple[int, int, int, int]]] = {}  # key: (gen, seq, pos, size)
    for sid in segment_ids(idx.seg_dir):
        seg = idx.segment(sid)
        try:
            f = open(seg.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            del idx.segs[sid]
            continue
        with f:
            size = os.fstat(f.fileno()).st_size
            good = 0
            while True:
                rec, problem = read_seg_one(f, size - good)
                if rec is None:
                    break
                seg.touched.add(rec.key)
                if rec.tomb:
                    seg.tombs[rec.key] = max(rec.gen, seg.tombs.get(rec.key, -1))
                    tombs[rec.key] = max(rec.gen, tombs.get(rec.key, -1))
                else:
                    found.setdefault(rec.key, []).append((rec.gen, rec.seq, sid << SHIFT | good,
                                                          rec.size))
                good += rec.size
        seg.size = good
        idx.seg_bytes += good
        if problem is not None and cut:
            log.warning("spool segment %d: %s at offset %d; cutting %d bytes", sid, problem,
                        good, size - good)
            rollback(seg.path, good, strict=True)
            idx.torn_tails += 1
            idx.torn_bytes += size - good
    where: dict[str, set[int]] = {}
    for seg in idx.segs.values():
        for key in seg.touched:
            where.setdefault(key, set()).add(seg.sid)
    for key in set(found) | set(tombs):
        ki = idx.keys[key] = KeyIndex(gen=tombs.get(key, -1) + 1)
        by_seq: dict[int, tuple[int, int]] = {}
        for gen, seq, pos, size in found.get(key, []):
            ki.next_seq = max(ki.next_seq, seq + 1) if gen == ki.gen else ki.next_seq
            if gen == ki.gen:
                by_seq[seq] = (pos, size)  # a copy left by a cut-short compaction: once
        for seq in sorted(by_seq):
            pos, size = by_seq[seq]
            idx._add(key, ki, pos >> SHIFT, pos & ((1 << SHIFT) - 1), size)
        ki.touched.update(where.get(key, ()))
    if found or tombs:
        log.info("spool: %d segments, %d keys", len(idx.segs), len(idx.log_keys()))
    return idx

