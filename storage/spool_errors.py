"""The spool's errors: nothing asked of the spool is durable when one is raised."""

from __future__ import annotations

from domain.errors import StorageFull
from storage.journal import JournalError


class SpoolError(JournalError):
    """A spool operation failed; nothing it was asked to make durable is durable.

    ``key`` is the key it concerns (None if it concerns no one key). It is kept out
    of ``str()``: the message may be logged, with its traceback, and keys join to
    a patient."""

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key


class SpoolFull(SpoolError, StorageFull):
    """The disk budget would be exceeded; nothing was queued (the tree's
    :class:`~domain.errors.StorageFull`: wait and send it again)."""


class SpoolClosed(SpoolError):
    """The committer is not running (not started yet, or stopped)."""
