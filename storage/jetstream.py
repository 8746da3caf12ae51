"""The replicated journal: a :class:`storage.journal.Journal` on NATS JetStream.

What is stored where (``docs/fleet.md``):

* every record (pose batch, media batch, session start...) is one message in the
  stream ``TELEMETRY_JOURNAL``, subject ``journal.<key tokens>`` (the key's ``/``
  become ``.``; ``_`` and ``.`` inside a segment are escaped), its kind in a
  header, its payload zlib-compressed when asked and when that is smaller;
* a key's state (how far its end and finalisation have got) is one JSON value in the
  KV bucket ``TELEMETRY_JOURNAL_STATE`` (history 1), under the same tokens;
* both at the configured replication factor (R3 in production and in the tests).

**What an acknowledgement means.** A method returns only once JetStream has
acknowledged the write: the stream's leader has stored it and a quorum of its
replicas (2 of 3 for R3) has it. NATS writes to the OS at once and fsyncs on its
``sync_interval`` (2 min by default); so an acknowledged record survives the loss of
one node, or the kill of every process, but not the loss of power to a quorum within
the interval, unless the servers run with ``sync_interval: always``.

Contract (:mod:`storage.journal`): errors are :class:`JetStreamError` (a
:class:`storage.journal.JournalError`); a stream at its byte limit raises
:class:`JetStreamFull`, also a :class:`domain.errors.StorageFull`; no answer within
``timeout_s`` (the cluster is down or has no quorum) raises JetStreamError, never a
hang. A key's operations take effect in call order (:mod:`storage.jetstream_client`
chains them; appends stay pipelined). Cancellation: ``Cancelled`` propagates at
once; an op not yet issued is dropped, one already issued may still take effect (a
later replay may contain that record; a message is whole or absent, never torn).
:meth:`JetStreamJournal.replay` skips (and counts) a message it cannot decode.

**The asyncio bridge** (nats-py is asyncio-only; :mod:`storage.jetstream_bridge`):
both trio-asyncio and a dedicated asyncio loop in a thread are implemented. The
default is the **thread**: measured with ``python -m bench.bench_journal`` (64
sessions appending 16 KB records back to back, R3 on 3 local nodes, everything on
2 shared CPUs; three runs), the thread bridge acknowledged 4,600-4,900 appends/s at
p50 12-13 ms / p99 23-30 ms, trio-asyncio 2,300-3,200 appends/s at p50 19-27 ms /
p99 37-46 ms (the local spool in the same runs: 4,600-6,200/s, p50 10-14 ms, p99
12-17 ms). The thread also keeps nats-py's parsing, flushing and reconnect loop off
the Trio loop, so a slow or reconnecting cluster cannot stall request handling, and
it needs no extra dependency in the production image (trio-asyncio is a test
dependency, kept so the measurement can be repeated).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from storage.jetstream_bridge import Bridge, open_bridge
from storage.jetstream_client import (
    AsyncJournal,
    JetStreamError,
    JetStreamFull,
    JetStreamMoved,
    Op,
    encode,
    encode_key,
)
from storage.jetstream_owners import BUCKET as OWNERS_BUCKET
from storage.jetstream_owners import AsyncOwners, JetStreamOwnership
from storage.journal import Record
from storage.ownership import TakeOver
from storage.spool_format import check_append, check_key

__all__ = ["DEFAULT_BRIDGE", "JetStreamError", "JetStreamFull", "JetStreamJournal",
           "JetStreamMoved", "encode_key", "open_jetstream_journal"]

DEFAULT_BRIDGE = "thread"  # why: the module docstring

STREAM = "TELEMETRY_JOURNAL"
SUBJECT_ROOT = "journal"
BUCKET = "TELEMETRY_JOURNAL_STATE"


class JetStreamJournal:
    """A :class:`storage.journal.Journal` on a JetStream stream and KV bucket; build it
    with :func:`open_jetstream_journal`. See the module docstring."""

    def __init__(self, bridge: Bridge, client: AsyncJournal, *, compress_level: int = 1) -> None:
        self._bridge = bridge
        self._client = client
        self._level = compress_level
        self._open = True
        self._counts = dict(appends=0, bytes=0, failed=0, unreadable=0, fenced=0,
                            take_overs=0)

    def stats(self) -> dict[str, Any]:
        return dict(self._counts)

    async def append(self, key: str, kind: int, payload: bytes, *, compress: bool = True) -> None:
        """Publish one record; returns once the stream acknowledged it (quorum).
        ValueError for a bad key, a kind outside 0..65535 or a payload over 64 MiB
        (the server's ``max_payload`` is lower: that is a JetStreamError)."""
        data = check_append(key, kind, payload)
        stored, headers = encode(kind, data, self._level if compress else 0)
        await self._write(Op(key, "append", stored, headers))
        self._counts["appends"] += 1
        self._counts["bytes"] += len(stored)

    async def set_state(self, key: str, state: dict[str, Any]) -> None:
        """Put ``key``'s state in the bucket, after the key's earlier operations."""
        check_key(key)
        if not isinstance(state, dict):
            raise TypeError("state must be a dict")
        data = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
        await self._write(Op(key, "state", data))

    async def remove(self, key: str) -> None:
        """Purge ``key``'s subject and its state, after its earlier operations."""
        check_key(key)
        await self._write(Op(key, "remove"))

    async def take_over(self, key: str) -> TakeOver:
        """Fleet mode (:mod:`storage.ownership`): replay ``key`` and fence out every
        other writer; after its earlier operations. Raises ``ClaimLost`` (a
        JetStreamError) if other writers kept appending meanwhile."""
        check_key(key)
        result: TakeOver = await self._write(Op(key, "take"))
        self._counts["take_overs"] += 1
        return result

    async def _write(self, op: Op) -> Any:
        if not self._open:
            raise JetStreamError("the journal is closed")
        op.result = concurrent.futures.Future()
        try:
            self._bridge.post(functools.partial(self._client.submit, op))
        except RuntimeError as exc:  # the loop is gone
            raise JetStreamError("the journal's event loop is closed") from exc
        try:
            return await self._bridge.wait(op.result)
        except JetStreamMoved:
            self._counts["fenced"] += 1
            raise
        except JetStreamError:
            self._counts["failed"] += 1
            raise

    async def state(self, key: str) -> dict[str, Any] | None:
        """``key``'s state, None if it has none or it does not parse."""
        check_key(key)
        return await self._read(functools.partial(self._client.state, key))

    async def replay(self, key: str) -> list[Record]:
        """``key``'s records in order (undecodable messages skipped and counted)."""
        check_key(key)
        records, bad = await self._read(functools.partial(self._client.replay, key))
        self._counts["unreadable"] += bad
        return list(records)

    async def sessions(self) -> list[str]:
        """Keys with records in the stream or a state in the bucket, sorted."""
        return list(await self._read(self._client.sessions))

    async def _read(self, fn: Any) -> Any:
        if not self._open:
            raise JetStreamError("the journal is closed")
        return await self._bridge.call(fn)

    async def open_ownership(self, instance: str, lease_s: float,
                             bucket: str = OWNERS_BUCKET) -> JetStreamOwnership:
        """Fleet mode: the ownership records (:mod:`storage.jetstream_owners`) on this
        journal's connection, for ``instance`` with leases of ``lease_s``."""
        owners = AsyncOwners(self._client.js, bucket=bucket, replicas=self._client.replicas,
                             lease_s=lease_s)
        await self._read(owners.open)
        return JetStreamOwnership(self._bridge, owners, instance)

    async def delete_everything(self, owners_bucket: str = OWNERS_BUCKET) -> None:
        """Delete the stream, the state bucket and the ownership bucket if there is one
        (tests and the bench clean up with it)."""
        await self._read(functools.partial(self._client.delete_everything, owners_bucket))


@asynccontextmanager
async def open_jetstream_journal(
    servers: list[str], *, replicas: int = 3, bridge: str = DEFAULT_BRIDGE,
    stream: str = STREAM, subject_root: str = SUBJECT_ROOT, bucket: str = BUCKET,
    max_bytes: int = -1, timeout_s: float = 5.0, ready_timeout_s: float = 30.0,
    compress_level: int = 1, fenced: bool = False, max_age_s: float = 0.0,
    state_ttl_s: float = 0.0,
) -> AsyncIterator[JetStreamJournal]:
    """Connect to ``servers``, create or update the stream and the bucket (retried for
    up to ``ready_timeout_s`` while the cluster elects its leaders), yield the
    journal; on exit close the connection and stop the bridge (shielded, bounded).
    ``fenced``: fleet mode, every session write fenced (:mod:`storage.ownership`).
    ``max_age_s`` / ``state_ttl_s`` (0: unbounded): the stream's and the state
    bucket's retention, which bounds what unfinished or ended sessions leave behind.
    Raises :class:`JetStreamError` if the cluster cannot be reached or set up in time."""
    async with open_bridge(bridge) as br:
        client = AsyncJournal(servers=servers, stream=stream, subject_root=subject_root,
                              bucket=bucket, replicas=replicas, max_bytes=max_bytes,
                              timeout_s=timeout_s, fenced=fenced, max_age_s=max_age_s,
                              state_ttl_s=state_ttl_s)
        journal = JetStreamJournal(br, client, compress_level=compress_level)
        try:
            await br.call(functools.partial(client.open, ready_timeout_s=ready_timeout_s))
            yield journal
        finally:
            journal._open = False
            with trio.move_on_after(10) as scope:
                scope.shield = True
                await br.call(client.close)
