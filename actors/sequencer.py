"""Admission and ordering of a session's batches by sequence number.

The policy (documented in ``docs/pose-batch-format.md``):

* Sequence numbers start at 0 and go up by one per batch.
* A batch already applied, or already accepted and waiting, is a *duplicate*: it is
  acknowledged again and not applied twice.
* A batch up to ``window`` ahead of the next one to apply is accepted and held until
  the ones before it arrive; further ahead is refused with a retryable answer.
* A missing batch is waited for ``gap_timeout`` seconds; then it is *skipped* and
  what follows is applied. A skipped batch that turns up later is refused (409):
  its place in the timeline has passed.
* Timestamps must keep increasing across batches in sequence order; a batch whose
  frames overlap an accepted neighbour is refused (400) before it is acknowledged.

Everything here is synchronous and free of checkpoints, so the HTTP handler and the
actor, which share one Trio thread, always see a consistent state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Skipped numbers are remembered so a late arrival gets a precise 409; beyond this
# many, older ones are forgotten (they then read as duplicates, which is harmless).
_MAX_SKIPPED_REMEMBERED = 4096


class Verdict(enum.StrEnum):
    """What became of one batch. The first five are the sequencer's; the rest are
    the session's admission's (:mod:`actors.admission`). A verdict says what
    happened; the refusal the client gets is the offer's error
    (:class:`actors.admission.Offer`)."""

    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"
    AHEAD_OF_WINDOW = "ahead_of_window"
    OVERLAP = "overlap"
    ENDED = "ended"
    ENDING = "session_ending"
    SPACE_CHANGED = "space_changed"
    RATE_LIMITED = "rate_limited"
    MAILBOX_FULL = "mailbox_full"


@dataclass
class Sequencer:
    window: int
    next_seq: int = 0
    last_applied_t: int | None = None
    # accepted but not applied yet: seq -> (first_t, last_t)
    pending: dict[int, tuple[int, int]] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)
    skipped_count: int = 0

    def check(self, seq: int, first_t: int, last_t: int) -> tuple[Verdict, str]:
        """Judge a batch without changing state. Returns the verdict and, if not
        ACCEPT or DUPLICATE, a sentence for the client."""
        if seq < self.next_seq:
            if seq in self.skipped:
                return Verdict.SKIPPED, (
                    f"batch {seq} arrived after the session stopped waiting for it"
                )
            return Verdict.DUPLICATE, ""
        if seq in self.pending:
            return Verdict.DUPLICATE, ""
        if seq > self.next_seq + self.window:
            return Verdict.AHEAD_OF_WINDOW, (
                f"batch {seq} is more than {self.window} ahead of the next expected "
                f"batch {self.next_seq}"
            )
        lower_t = self.last_applied_t
        lower_seq: int | None = None
        upper: tuple[int, int] | None = None
        for s, (f, lt) in self.pending.items():
            if s < seq and (lower_seq is None or s > lower_seq):
                lower_seq, lower_t = s, lt
            elif s > seq and (upper is None or s < upper[0]):
                upper = (s, f)
        if lower_t is not None and first_t <= lower_t:
            return Verdict.OVERLAP, (
                f"batch {seq} starts at {first_t} ms, not after the previous batch's last "
                f"frame at {lower_t} ms"
            )
        if upper is not None and last_t >= upper[1]:
            return Verdict.OVERLAP, (
                f"batch {seq} ends at {last_t} ms, not before batch {upper[0]} starts at "
                f"{upper[1]} ms"
            )
        return Verdict.ACCEPT, ""

    def accept(self, seq: int, first_t: int, last_t: int) -> None:
        self.pending[seq] = (first_t, last_t)

    def withdraw(self, seq: int) -> None:
        """Undo :meth:`accept` for a batch that could not be queued after all."""
        self.pending.pop(seq, None)

    def applied(self, seq: int, last_t: int) -> None:
        assert seq == self.next_seq, (seq, self.next_seq)
        self.pending.pop(seq, None)
        self.next_seq = seq + 1
        self.last_applied_t = last_t

    def skip(self) -> None:
        """Give up on the missing batch ``next_seq``."""
        if len(self.skipped) >= _MAX_SKIPPED_REMEMBERED:
            self.skipped.discard(min(self.skipped))
        self.skipped.add(self.next_seq)
        self.skipped_count += 1
        self.next_seq += 1
