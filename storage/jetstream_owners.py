"""Ownership records and instance heartbeats on a JetStream KV bucket: the
:class:`storage.ownership.Ownership` of fleet mode.

The bucket ``TELEMETRY_OWNERS`` (history 1, the journal's replication factor) holds:

* ``s.<key tokens>``: a session's owner, ``{"i": <instance>, "t": <since>}``
  (``"i": ""`` once released at passivation), changed only by compare-and-set on the
  entry's revision (``Nats-Expected-Last-Subject-Sequence``, which KV ``create`` and
  ``update`` use);
* ``i.<instance>``: an instance's heartbeat, ``{"until": <wall clock>}``, renewed
  every ``lease_s / 3`` by the host; past ``until`` the instance's sessions are
  orphans (its lease expired).

Instances' clocks are assumed NTP-synchronised to well within ``lease_s`` (Fargate
and EC2 use the Amazon Time Sync Service); a skewed clock only shifts when an orphan
is claimed: fencing in the journal, not these records, keeps two owners harmless.

:class:`AsyncOwners` runs on the journal's asyncio loop; :class:`JetStreamOwnership`
is its Trio face through the same bridge. Errors are mapped to
:class:`storage.jetstream_client.JetStreamError` (a
:class:`storage.journal.JournalError`), a lost compare-and-set to
:class:`storage.ownership.ClaimLost`; cancellation propagates (an unissued op is
dropped, an issued one may still take effect).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

import nats.js.errors
from nats.js import api

from storage.jetstream_bridge import Bridge
from storage.jetstream_client import (
    JetStreamClaimLost,
    JetStreamError,
    decode_key,
    encode_key,
    guarded,
)
from storage.ownership import Owner, Survey

BUCKET = "TELEMETRY_OWNERS"
SESSION, INSTANCE = "s.", "i."


def _json(value: bytes | None) -> dict[str, Any]:
    try:
        out = json.loads(value or b"")
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


class AsyncOwners:
    """The bucket, on the journal's connection (asyncio side)."""

    def __init__(self, js: Any, *, bucket: str, replicas: int, lease_s: float) -> None:
        self.js, self.bucket, self.replicas, self.lease_s = js, bucket, replicas, lease_s
        self.kv: Any = None

    async def open(self, ready_timeout_s: float = 30.0) -> None:
        """Create (or bind) the bucket, retrying while the cluster has no leader for
        it yet, up to ``ready_timeout_s``."""
        config = api.KeyValueConfig(bucket=self.bucket, history=1, replicas=self.replicas,
                                    storage=api.StorageType.FILE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout_s
        while True:
            try:
                self.kv = await guarded("opening the owners bucket",
                                        self.js.create_key_value(config))
                return
            except JetStreamError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.25)

    async def _get(self, key: str) -> Any:
        try:
            return await guarded("owner", self.kv.get(key))
        except Exception as exc:
            if isinstance(exc.__cause__, nats.js.errors.KeyNotFoundError):
                return None  # KeyDeletedError is one too
            raise

    async def heartbeat(self, instance: str) -> None:
        value = json.dumps({"until": time.time() + self.lease_s}).encode()
        await guarded("heartbeat", self.kv.put(INSTANCE + instance, value))

    async def leave(self, instance: str) -> None:
        await guarded("leaving", self.kv.delete(INSTANCE + instance))

    async def alive(self, instance: str) -> bool:
        entry = await self._get(INSTANCE + instance)
        return entry is not None and float(_json(entry.value).get("until", 0)) > time.time()

    async def claim(self, key: str, instance: str, steal: bool) -> bool:
        name = SESSION + encode_key(key)
        value = json.dumps({"i": instance, "t": time.time()}).encode()
        entry = await self._get(name)
        try:
            if entry is None:
                await guarded("claim", self.kv.create(name, value))
                return True
            current = str(_json(entry.value).get("i", ""))
            if current == instance:
                return True
            if current and not steal and await self.alive(current):
                return False
            await guarded("claim", self.kv.update(name, value, last=entry.revision))
            return True
        except JetStreamError as exc:
            if _lost_race(exc):
                raise JetStreamClaimLost("another instance claimed the session first") from exc
            raise

    async def owner(self, key: str) -> Owner | None:
        entry = await self._get(SESSION + encode_key(key))
        if entry is None:
            return None
        d = _json(entry.value)
        return Owner(str(d.get("i", "")), float(d.get("t", 0)))

    async def _if_mine(self, key: str, instance: str, released: bool) -> None:
        name = SESSION + encode_key(key)
        entry = await self._get(name)
        if entry is None or _json(entry.value).get("i") != instance:
            return
        try:
            if released:
                value = json.dumps({"i": "", "t": time.time()}).encode()
                await guarded("release", self.kv.update(name, value, last=entry.revision))
            else:
                await guarded("forget", self.kv.delete(name, last=entry.revision))
        except JetStreamError as exc:
            if not _lost_race(exc):
                raise
            # claimed by another instance meanwhile: not ours to change

    async def release(self, key: str, instance: str) -> None:
        await self._if_mine(key, instance, released=True)

    async def forget(self, key: str, instance: str) -> None:
        await self._if_mine(key, instance, released=False)

    async def survey(self) -> Survey:
        survey, now = Survey(), time.time()
        watcher = await guarded("survey", self.kv.watchall(ignore_deletes=True))
        try:
            while True:
                entry = await guarded("survey", watcher.updates(timeout=10))
                if entry is None:
                    return survey
                d = _json(entry.value)
                if entry.key.startswith(INSTANCE):
                    if float(d.get("until", 0)) > now:
                        survey.alive.add(entry.key[len(INSTANCE):])
                elif entry.key.startswith(SESSION):
                    survey.owners[decode_key(entry.key[len(SESSION):])] = Owner(
                        str(d.get("i", "")), float(d.get("t", 0)))
        finally:
            await watcher.stop()


def _lost_race(exc: JetStreamError) -> bool:
    """The compare-and-set failed: the entry changed since it was read."""
    cause = exc.__cause__
    if isinstance(cause, nats.js.errors.KeyWrongLastSequenceError):
        return True
    return isinstance(cause, nats.js.errors.APIError) and cause.err_code in (10071, 10164)


class JetStreamOwnership:
    """:class:`storage.ownership.Ownership` for ``instance``, through ``bridge``."""

    def __init__(self, bridge: Bridge, owners: AsyncOwners, instance: str) -> None:
        self._bridge, self._owners, self.instance = bridge, owners, instance

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await self._bridge.call(functools.partial(fn, *args))

    async def heartbeat(self) -> None:
        await self._call(self._owners.heartbeat, self.instance)

    async def leave(self) -> None:
        await self._call(self._owners.leave, self.instance)

    async def claim(self, key: str, *, steal: bool) -> bool:
        result: bool = await self._call(self._owners.claim, key, self.instance, steal)
        return result

    async def owner(self, key: str) -> Owner | None:
        result: Owner | None = await self._call(self._owners.owner, key)
        return result

    async def release(self, key: str) -> None:
        await self._call(self._owners.release, key, self.instance)

    async def forget(self, key: str) -> None:
        await self._call(self._owners.forget, key, self.instance)

    async def survey(self) -> Survey:
        result: Survey = await self._call(self._owners.survey)
        return result
