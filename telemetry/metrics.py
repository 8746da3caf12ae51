"""Prometheus metrics: a per-app registry, request-path instruments, scrape-time state.

Two kinds of metric live here:

* **Instruments** updated in the request path (:class:`Metrics`): counters and
  histograms whose update is a dict lookup and an add. Labels are bounded sets
  (route templates, HTTP status codes, error codes from the code base) -- never a
  session, patient or organisation id, never a raw URL path.
* **State** read when Prometheus scrapes (:class:`StateCollector`): live sessions,
  mailbox depth, spool and outbox figures, straight from the supervisor's,
  spool's and outbox's own ``stats()``; nothing is mirrored or kept in step.

Every app gets its own :class:`~prometheus_client.CollectorRegistry` (never the
global default), so several services in one process -- the tests -- do not collide.
That registry also carries what the default one would: the ``process_*``,
``python_info`` and ``python_gc_*`` collectors, and ``telemetry_build_info``.
``docs/operations.md`` lists every metric with its type and labels.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from actors.session import SessionActor
    from actors.supervisor import Supervisor
    from storage.outbox import Outbox
    from storage.spool import Spool

PREFIX = "telemetry"
# Finalisation is an upload plus a publish: tens of milliseconds on a local disk, up
# to the S3 client's retries (tens of seconds) when the store is in trouble.
FINALISE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A replay blob is ~10-20 KiB per second of session (gzip) -- 16 KiB .. 256 MiB.
BLOB_BUCKETS = tuple(float(16 * 1024 * 4**i) for i in range(8))
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
DISTRIBUTION = "restartix-telemetry"
COMMIT_ENV = "TELEMETRY_BUILD_COMMIT"
# A label value taken from the environment or git: a short safe token, else "unknown".
_SAFE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def _safe(value: str | None) -> str:
    value = (value or "").strip()
    return value if _SAFE_LABEL.fullmatch(value) else "unknown"


@functools.cache
def build_info() -> tuple[str, str]:
    """``(version, commit)`` of the running code, worked out once per process.

    The version is the installed distribution's. The commit is ``TELEMETRY_BUILD_COMMIT``
    (the image build sets it), else ``git rev-parse HEAD`` of a source checkout this
    package sits in (the repository's own ``.git``, not one further up the tree), else
    ``unknown``."""
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = os.environ.get(COMMIT_ENV)
    if not commit:
        root = Path(__file__).resolve().parent.parent
        if (root / ".git").exists():
            try:
                done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                      capture_output=True, text=True, timeout=5, check=False)
                commit = done.stdout.strip() if done.returncode == 0 else None
            except (OSError, subprocess.SubprocessError):
                commit = None
    return _safe(version), _safe(commit)


def method_label(method: str) -> str:
    """The request method as a label; anything unusual is ``other`` (a client picks
    the method, and a label must not be an open set)."""
    return method if method in KNOWN_METHODS else "other"


class Metrics:
    """The request-path instruments of one app, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # What prometheus-client's default registry carries; each reads this process.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        version, commit = build_info()
        Gauge(f"{PREFIX}_build_info", "Always 1; the running code's version and commit as labels.",
              ["version", "commit"], registry=r).labels(version, commit).set(1)
        self.requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests answered, by route template and status.",
            ["method", "endpoint", "status"], registry=r)
        self.request_seconds = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from routing to the response being built, by route template.",
            ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.batches = Counter(
            f"{PREFIX}_batches",
            "Authenticated ingest batches by endpoint (pose|media) and outcome "
            "(accepted|duplicate|rejected).",
            ["endpoint", "outcome"], registry=r)
        self.batches_rejected = Counter(
            f"{PREFIX}_batches_rejected",
            "Authenticated ingest batches refused, by endpoint and the answer's error code.",
            ["endpoint", "reason"], registry=r)
        self.media_events = Counter(
            f"{PREFIX}_media_events",
            "Media events in accepted batches: applied, or not applied (duplicate or late).",
            ["outcome"], registry=r)
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures",
            "Refused credentials by token kind (session|service) and reason.",
            ["kind", "reason"], registry=r)
        self.finalise_seconds = Histogram(
            f"{PREFIX}_finalise_duration_seconds",
            "Time an end call waited for its session to be finalised (replay upload and "
            "event publish), by end reason (client_end|admin). Idle, max-duration and "
            "shutdown ends are not timed.",
            ["reason"], buckets=FINALISE_BUCKETS, registry=r)
        self.blob_bytes = Histogram(
            f"{PREFIX}_blob_size_bytes",
            "Size of replay blobs written by sessions ended through an end call "
            "(_sum is the bytes written).",
            buckets=BLOB_BUCKETS, registry=r)
        self.storage_unavailable = Counter(
            f"{PREFIX}_storage_unavailable",
            "503 storage_unavailable answers: the spool or the blob store (S3) failed "
            "while admitting data, by endpoint (pose|media).",
            ["endpoint"], registry=r)

        self._batch_children: dict[tuple[str, str], Any] = {}
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.streams_open = Gauge(
            f"{PREFIX}_pose_streams_open", "Pose WebSocket streams open now.", registry=r)
        self.streams_closed = Counter(
            f"{PREFIX}_pose_streams_closed",
            "Pose WebSocket streams closed, by reason (closed: by the client or the "
            "network; else session_ended|token_expired|idle_timeout|shutting_down|"
            "too_many_sessions|text_message).",
            ["reason"], registry=r)
        self.connection_errors = Counter(
            f"{PREFIX}_connection_errors",
            "Connections ended by an unexpected exception in the HTTP/WebSocket server "
            "(contained: the server goes on), by exception type.",
            ["error"], registry=r)
        self.connections_dropped = Counter(
            f"{PREFIX}_connections_dropped",
            "Connections closed because the client did not read what was sent to it, by "
            "reason (send_timeout: no progress in time; shutdown: not drained by the "
            "graceful deadline).",
            ["reason"], registry=r)
        self.stream_ack_seconds = Histogram(
            f"{PREFIX}_stream_ack_duration_seconds",
            "Time from a stream batch being read to its acknowledgement (durable), "
            "flow-control waits included.",
            buckets=REQUEST_BUCKETS, registry=r)
        self.frames_received = Counter(
            f"{PREFIX}_frames_received",
            "Pose frames in accepted batches (duplicates not counted again), both transports.",
            registry=r)
        self.bytes_received = Counter(
            f"{PREFIX}_received_bytes",
            "Body bytes of ingest batches taken, by endpoint: new pose batches (a "
            "duplicate is not counted again), media batches answered 202.",
            ["endpoint"], registry=r)
        # Kept children: a batch adds to them with no label lookup.
        self._frames = self.frames_received
        self._pose_bytes = self.bytes_received.labels("pose")
        self._media_bytes = self.bytes_received.labels("media")
        self.cors_refused = Counter(
            f"{PREFIX}_cors_preflight_refused",
            "CORS preflights refused, by reason (cors_origin_not_allowed|"
            "cors_method_not_allowed|cors_header_not_allowed).", ["reason"], registry=r)

    def count_pose_received(self, frames: int, nbytes: int) -> None:
        """A new pose batch taken (not a duplicate): its frames and body bytes."""
        self._frames.inc(frames)
        self._pose_bytes.inc(nbytes)

    def count_media_received(self, nbytes: int) -> None:
        """A media batch taken: its body bytes (its events: :attr:`media_events`)."""
        self._media_bytes.inc(nbytes)

    def count_request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """One answered request (``method`` already through :func:`method_label`).
        Its two children are kept per (method, endpoint, status): the labels are
        bounded (methods by :func:`method_label`, endpoints are route templates), so a
        request costs one dict lookup here, not two label lookups."""
        children = self._request_children.get((method, endpoint, status))
        if children is None:
            children = self._request_children[(method, endpoint, status)] = (
                self.requests.labels(method, endpoint, str(status)),
                self.request_seconds.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def count_batch(self, kind: str, outcome: str, reason: str | None = None) -> None:
        """One authenticated ingest batch (``pose``/``media``): ``accepted``,
        ``duplicate``, or ``rejected`` with the answer's error code as ``reason``.
        The hot two children are kept, so a batch costs one dict lookup here."""
        child = self._batch_children.get((kind, outcome))
        if child is None:
            child = self._batch_children[(kind, outcome)] = self.batches.labels(kind, outcome)
        child.inc()
        if outcome == "rejected":
            self.batches_rejected.labels(kind, reason or "http_error").inc()
            if reason == "storage_unavailable":
                self.storage_unavailable.labels(kind).inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape and its content type, negotiated from
        ``Accept`` (Prometheus text 0.0.4 unless OpenMetrics is asked for)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


@dataclass(frozen=True)
class SessionTotals:
    """What the live sessions add up to at one moment."""

    live: int = 0
    mailbox_depth: int = 0
    mailbox_depth_max: int = 0
    held: int = 0


# Sessions summed between two checkpoints (a few reads each), so a scrape of the
# maximum 5000 sessions never holds the Trio loop for more than ~10 ms at a time.
SESSIONS_PER_CHECKPOINT = 250


def _add(totals: list[int], actor: SessionActor) -> None:
    # Not snapshot(): that applies the session's pending chunk, work a scrape must not do.
    depth, held = actor.queued()
    totals[0] += 1
    totals[1] += depth
    totals[2] = max(totals[2], depth)
    totals[3] += held


def session_totals(supervisor: Supervisor) -> SessionTotals:
    """Sum the live sessions' snapshots in one go."""
    totals = [0, 0, 0, 0]
    for actor in supervisor.live():
        _add(totals, actor)
    return SessionTotals(*totals)


async def session_totals_async(supervisor: Supervisor) -> SessionTotals:
    """:func:`session_totals`, letting other tasks run every
    :data:`SESSIONS_PER_CHECKPOINT` sessions (a session that ends meanwhile is
    still counted: a scrape is a moment, give or take)."""
    totals = [0, 0, 0, 0]
    for i, actor in enumerate(supervisor.live()):
        if i and i % SESSIONS_PER_CHECKPOINT == 0:
            await trio.lowlevel.checkpoint()
        _add(totals, actor)
    return SessionTotals(*totals)


@dataclass
class StateSources:
    """Where scrape-time state comes from; each getter may return ``None``
    (no spool with ``TELEMETRY_SPOOL=off``, no outbox in some wirings)."""

    supervisor: Callable[[], Supervisor]
    spool: Callable[[], Spool | None]
    outbox: Callable[[], Outbox | None]
    ready: Callable[[], bool]
    spool_max_bytes: int


class StateCollector(Collector):
    """Gauges and cumulative counters read from live state at scrape time.

    Runs on the Trio thread inside the ``/metrics`` handler (never from another
    thread: the state it reads is not locked). The cost is one ``snapshot()`` per
    live session: the handler sums them beforehand with checkpoints
    (:meth:`prepare`); a bare ``generate_latest`` sums them in one go.
    """

    def __init__(self, sources: StateSources) -> None:
        self._src = sources
        self._prepared: SessionTotals | None = None

    async def prepare(self) -> None:
        """Sum the sessions for the next :meth:`collect`, yielding to other tasks."""
        self._prepared = await session_totals_async(self._src.supervisor())

    def describe(self) -> list[Metric]:
        # Describing by collecting would read state at registration; declare nothing
        # (the registry then skips duplicate-name checks for this collector).
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._sessions()
        yield from self._spool()
        yield from self._outbox()

    def _sessions(self) -> Iterator[Metric]:
        supervisor = self._src.supervisor()
        t, self._prepared = self._prepared or session_totals(supervisor), None
        yield _gauge("ready", "1 while the service admits traffic (readiness), else 0.",
                     1 if self._src.ready() else 0)
        yield _gauge("live_sessions", "Live session actors in this process.", t.live)
        yield _gauge("mailbox_depth", "Batches queued in all live sessions' mailboxes.",
                     t.mailbox_depth)
        yield _gauge("mailbox_depth_max", "The fullest live session mailbox.",
                     t.mailbox_depth_max)
        yield _gauge("held_batches", "Batches held for reordering across live sessions.",
                     t.held)
        yield _counter("actor_crashes", "Sessions ended with reason actor_error.",
                       supervisor.crashed)
        yield _gauge("mailbox_capacity", "Batches one session's mailbox holds "
                     "(TELEMETRY_MAILBOX_SIZE); a full one answers 503 mailbox_full.",
                     supervisor.settings.mailbox_size)
        ended = CounterMetricFamily(
            f"{PREFIX}_sessions_ended", "Session actors ended, by end reason (client_end|"
            "admin|idle_timeout|max_duration|shutdown|actor_error).", labels=["reason"])
        # A copy: an actor ending while this runs must not change the dict under us.
        for reason, count in sorted(dict(supervisor.ended_by_reason).items()):
            ended.add_metric([reason], count)
        yield ended
        # Ended sessions' skips, plus what live ones skipped so far: one rising total.
        # Summed here, with no checkpoint between the two reads (not in prepare(),
        # which yields): an actor that ended meanwhile would be counted twice, and
        # the next scrape would see the counter go down.
        skipped = supervisor.skipped_ended + sum(a.skipped for a in supervisor.live())
        yield _counter("batches_skipped", "Batches never received: skipped after the "
                       "gap timeout, or when the session ended with a gap.", skipped)
        fleet = supervisor.fleet
        if fleet is not None:
            yield _counter("fleet_take_overs", "Sessions this instance took over from the "
                           "journal (a request or an orphan claim).", fleet.take_overs)
            yield _counter("fleet_take_over_seconds", "Seconds spent taking sessions over "
                           "(replay and rebuild); divide by fleet_take_overs.",
                           fleet.take_over_seconds)
            yield _counter("fleet_sessions_lost", "Actors stopped here because another "
                           "instance took their session over.", fleet.lost)
            yield _counter("fleet_orphans_claimed", "Sessions claimed here after their "
                           "owner's lease expired or it passivated them.",
                           fleet.orphans_claimed)
            yield _counter("fleet_sweep_failures", "Ownership sweeps that failed (NATS "
                           "unreachable); retried at the next one.", fleet.sweep_failures)

    def _spool(self) -> Iterator[Metric]:
        spool = self._src.spool()
        if spool is None:
            return
        s: dict[str, Any] = spool.stats()
        yield _gauge("spool_bytes", "Bytes the spool holds (committed logs plus reservations).",
                     s["bytes_used"])
        yield _gauge("spool_max_bytes", "The spool's disk budget (TELEMETRY_SPOOL_MAX_BYTES); "
                     "past it batches get 503 spool_full.", self._src.spool_max_bytes)
        yield _gauge("spool_sessions", "Sessions with a log in the spool.", s["sessions"])
        yield _counter("spool_records", "Records appended to the spool.", s["records"])
        yield _counter("spool_appended_bytes", "Bytes appended to the spool.", s["bytes"])
        yield _counter("spool_fsyncs", "fsync calls made by the spool committer.", s["fsyncs"])
        yield _counter("spool_rounds", "Commit rounds of the spool.", s["rounds"])
        yield _counter("spool_failures", "Spool appends that failed (not acknowledged).",
                       s["failed"])
        yield _counter("spool_torn_tails", "Torn or corrupt log tails cut at start-up.",
                       s["torn_tails"])
        yield _counter("spool_torn_bytes", "Bytes cut from torn log tails.", s["torn_bytes"])
        yield _counter("spool_corrupt_states", "Session state files found corrupt.",
                       s["corrupt_states"])

    def _outbox(self) -> Iterator[Metric]:
        outbox = self._src.outbox()
        if outbox is None:
            return
        s = outbox.stats()
        yield _gauge("outbox_depth", "Events on disk waiting for bus delivery.", s["depth"])
        yield _counter("outbox_delivered", "Events delivered to the bus.", s["delivered"])
        yield _counter("outbox_delivery_failures", "Failed bus delivery attempts.",
                       s["failures"])
        yield _counter("outbox_dead", "Events given up on and moved to outbox/dead/.", s["dead"])
        yield _counter("outbox_rejected", "Events the receiver refused as malformed (a 4xx "
                       "about the event itself), moved to outbox/dead/ at once.",
                       s["rejected"])
        yield _counter("outbox_corrupt", "Unreadable outbox files set aside.", s["corrupt"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
