"""Builds the storage side from configuration: blob store, bus, and embedded sink.

Always: the journal (acknowledged batches: the spool on local disk by default, or
with ``TELEMETRY_JOURNAL=jetstream`` a replicated stream on NATS JetStream,
:mod:`storage.jetstream`) and the outbox (events on local disk until the bus takes
them). Embedded defaults (no configuration):
filesystem blobs under the data dir, the in-process bus, and the aggregate sink in
this process writing to an embedded Postgres (``pgserver``) or ``DATABASE_URL``.
Production: ``TELEMETRY_BLOB_STORE=s3`` and ``TELEMETRY_BUS=http`` (the sink then
runs on the Core API side, or as ``telemetry sink``).

:func:`open_storage` opens everything before yielding and closes it afterwards
under a shielded, time-bounded scope, so a cancelled shutdown still releases the
database and clients. Long-running maintenance (Postgres partitions) is not started
here: the entry point starts :meth:`Storage.run_maintenance` in its root nursery.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from actors.limits import ActorLimits
from storage import logtags
from storage.blobs import BlobStore, FilesystemBlobStore
from storage.bus import Bus, InProcessBus
from storage.journal import Journal
from storage.outbox import Outbox
from storage.ownership import Ownership
from storage.spool import Spool
from telemetry.auth import mint_service_token
from telemetry.config import Settings

SINK_SCOPE = "telemetry:sink"


@dataclass
class Storage:
    store: BlobStore
    bus: Bus  # what the actors publish to: the durable outbox, in front of `transport`
    transport: Bus | None = None  # the bus the outbox delivers to (in-process or HTTP)
    spool: Spool | None = None  # the local journal (its committer runs in serve)
    journal: Journal | None = None  # what the supervisor journals to: the spool or JetStream
    ownership: Ownership | None = None  # fleet mode: who owns which session
    sink: object | None = None  # storage.sink.AggregateSink in embedded mode
    db: object | None = None  # storage.pg.Database in embedded mode

    @property
    def outbox(self) -> Outbox | None:
        return self.bus if isinstance(self.bus, Outbox) else None

    async def flush_outbox(self, timeout_s: float) -> int:
        """Give the outbox up to ``timeout_s`` to deliver what it holds (at shutdown);
        return how many events are left on disk for the next start."""
        outbox = self.outbox
        if outbox is None:
            return 0
        with trio.move_on_after(timeout_s):
            while outbox.depth:  # noqa: ASYNC110 - no change event; shutdown only
                await trio.sleep(0.05)
        return outbox.depth

    async def run_maintenance(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep Postgres partitions ahead (embedded sink only); runs until cancelled."""
        if self.db is None:
            task_status.started()
            return
        from storage.migrate import run_partition_maintenance

        await run_partition_maintenance(self.db, task_status=task_status)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        with trio.move_on_after(15) as scope:
            scope.shield = True
            await self.bus.aclose()
            if self.transport is not None:
                await self.transport.aclose()
            await self.store.aclose()
            if self.db is not None:
                await self.db.aclose()  # type: ignore[attr-defined]


def actor_limits(settings: Settings) -> ActorLimits:
    """The supervisor's and actors' share of the configuration."""
    return ActorLimits(
        data_dir=Path(settings.data_dir), mailbox_size=settings.mailbox_size,
        reorder_window=settings.reorder_window, max_batches_per_s=settings.max_batches_per_s,
        gap_timeout_s=settings.gap_timeout_s, idle_timeout_s=settings.idle_timeout_s,
        max_session_s=settings.max_session_s, ended_retention_s=settings.ended_retention_s,
        shutdown_deadline_s=settings.shutdown_deadline_s, shutdown_mode=settings.shutdown_mode,
        max_live_sessions=settings.max_live_sessions,
        max_sessions_per_org=settings.max_sessions_per_org,
        blob_encoding=settings.blob_encoding, lease_s=settings.lease_s,
        orphan_grace_s=settings.orphan_grace_s,
    )


def open_blob_store(settings: Settings) -> BlobStore:
    """The configured blob store (filesystem or S3); the caller closes it."""
    if settings.blob_store == "s3":
        from storage.s3 import S3BlobStore

        return S3BlobStore(
            bucket=settings.s3_bucket, prefix=settings.s3_prefix, region=settings.s3_region,
            endpoint_url=settings.s3_endpoint_url, kms_key_id=settings.s3_kms_key_id,
        )
    return FilesystemBlobStore(Path(settings.data_dir) / "blobs")


class _TokenCache:
    """Mints the bus's service-account token and renews it before it expires."""

    def __init__(self, settings: Settings, ttl_s: int = 900) -> None:
        self._settings, self._ttl = settings, ttl_s
        self._token, self._expires = "", 0.0

    def __call__(self) -> str:
        if self._settings.bus_token:
            return self._settings.bus_token
        if time.time() > self._expires - 60:
            self._token = mint_service_token(
                self._settings, subject="telemetry", scope=SINK_SCOPE, ttl_s=self._ttl)
            self._expires = time.time() + self._ttl
        return self._token


@asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    # Before anything in storage can log a tag: keyed as the s_ pseudonyms are.
    logtags.configure(settings.pseudonym_key)
    store = open_blob_store(settings)
    bus: Bus
    if settings.bus == "http":
        from storage.http_bus import HttpBus

        assert settings.bus_url is not None
        bus = HttpBus(url=settings.bus_url, token_provider=_TokenCache(settings))
    else:
        bus = InProcessBus()
    data = Path(settings.data_dir)
    spool = Spool(data / "spool", max_bytes=settings.spool_max_bytes,
                  fsync_interval_s=settings.spool_fsync_ms / 1000.0) if settings.spool_enabled \
        else None
    if settings.journal == "jetstream":
        spool = None
    # Fleet mode: a summary counts as published once delivered, not once on this
    # instance's disk, which may go with the instance (storage.outbox, confirmed mode).
    outbox = Outbox(data / "outbox", bus, confirm=settings.journal == "jetstream")
    storage = Storage(store=store, bus=outbox, transport=bus, spool=spool, journal=spool)
    exits = AsyncExitStack()
    try:
        if settings.journal == "jetstream":
            from storage.jetstream import open_jetstream_journal

            # Retention: a record outlives any session that could need it (4 maximum
            # durations, at least a day); an ended summary is kept for its retention.
            journal = await exits.enter_async_context(open_jetstream_journal(
                list(settings.nats_urls), replicas=settings.journal_replicas, fenced=True,
                max_age_s=max(86400.0, 4 * settings.max_session_s),
                state_ttl_s=settings.ended_retention_s))
            storage.journal = journal
            storage.ownership = await journal.open_ownership(
                settings.instance_id or uuid.uuid4().hex[:12], settings.lease_s)
        if settings.bus == "inprocess" and settings.sink == "embedded":
            from storage.migrate import migrate
            from storage.pg import Database
            from storage.sink import AggregateSink

            db = await Database.open(database_url=settings.database_url,
                                     data_dir=Path(settings.data_dir))
            storage.db = db
            await migrate(db)
            sink = AggregateSink(db)
            storage.sink = sink
            assert isinstance(bus, InProcessBus)
            bus.subscribe(sink.handle)
        yield storage
    finally:
        try:
            await storage.aclose()
        finally:
            await exits.aclose()
