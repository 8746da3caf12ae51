"""Session level of the media metrics: all media views of one exercise session.

:class:`MediaTracker` holds one :class:`actors.media.MediaView` per ``view_id`` and
applies decoded batches to them; it refuses a batch as a whole
(:class:`MediaTrackerError`) before applying any of it. Pure and synchronous.
"""

from __future__ import annotations

from typing import Any

from actors.media import MediaView
from actors.media_correlate import merge_intervals
from domain.media_batch import MediaBatch


class MediaTrackerError(ValueError):
    """A batch the tracker refuses as a whole (nothing applied). ``code``:
    ``too_many_views`` | ``view_media_mismatch`` | ``finished``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class MediaTracker:
    """All media views of one exercise session, keyed by ``view_id``."""

    def __init__(self, *, max_views: int = 20) -> None:
        self.max_views = max_views
        self._views: dict[str, MediaView] = {}  # insertion order = creation order
        self.finished = False

    def apply(self, batch: MediaBatch) -> tuple[int, int]:
        """Apply a decoded batch; return (applied, not applied = duplicate + late events;
        events after the view's end count as applied but change nothing). A view is
        created by its first batch. Raises :class:`MediaTrackerError`
        before applying anything if the view cap is reached, the view id is already
        used for another media id, or :meth:`finish` was called."""
        self.check(batch)
        view = self._views.get(batch.view_id)
        if view is None:
            view = self._views[batch.view_id] = MediaView(
                batch.media_id, batch.view_id, batch.media_duration_s)
        elif view.media_duration_s is None:
            view.media_duration_s = batch.media_duration_s
        applied = sum(view.apply(ev) for ev in batch.events)
        return applied, len(batch.events) - applied

    def check(self, batch: MediaBatch) -> None:
        """Raise :class:`MediaTrackerError` if :meth:`apply` would refuse ``batch``
        (so the caller can refuse it before making it durable); changes nothing."""
        if self.finished:
            raise MediaTrackerError("finished", "the session's media views are finished")
        view = self._views.get(batch.view_id)
        if view is None:
            if len(self._views) >= self.max_views:
                raise MediaTrackerError("too_many_views", f"session already has "
                                        f"{self.max_views} media views (the cap)")
        elif view.media_id != batch.media_id:
            raise MediaTrackerError("view_media_mismatch", "view_id is already used for "
                                    "another media_id")

    def finish(self, end_t_ms: int | None) -> None:
        """Close every view (see :meth:`MediaView.finish`); later batches are refused."""
        for view in self._views.values():
            view.finish(end_t_ms)
        self.finished = True

    def summaries(self) -> list[dict[str, Any]]:
        return [v.summary() for v in self._views.values()]

    def stalls(self) -> list[tuple[int, int]]:
        """Genuine stalls of all views, sorted, overlaps merged."""
        return merge_intervals([s for v in self._views.values() for s in v.stalls()])
