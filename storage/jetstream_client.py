"""The asyncio half of the JetStream journal: everything here runs on the bridge's
asyncio loop (:mod:`storage.jetstream_bridge`), never on the Trio loop.

:class:`AsyncJournal` holds the nats-py connection, the stream and the KV bucket.
Writes arrive as :class:`Op` values through :meth:`AsyncJournal.submit` (posted in
call order); each becomes an asyncio task chained behind the key's previous op:

* an append waits only until the key's previous op has been *issued* (written to the
  connection's buffer, or finished if it was a state/remove), then publishes with
  ``publish_async``: appends of one key go out in call order and many are in flight
  at once, across keys and within a key (pipelining);
* ``set_state`` and ``remove`` wait until every earlier op of the key has *finished*
  (they touch the KV bucket, another stream, so wire order is not enough).

**Fencing** (fleet mode, ``fenced=True``; :mod:`storage.ownership`): every write of a
session key is published with ``Nats-Expected-Last-Subject-Sequence``, the subject's
last sequence as this instance last wrote or replayed it (0 for a key it never saw,
so a new session cannot start over an existing one). A refusal of that condition is
:class:`JetStreamMoved`. An append then waits for the key's previous op to *finish*
(its sequence is the next one's condition): appends stay pipelined across keys, one
at a time within a key (one batch a second per session). A state write also appends
a state record, fenced, before it updates the bucket, so a session's state is in its
log too, in order, where :meth:`AsyncJournal.take_over` reads it.

Every op is bounded by ``timeout_s`` (no ack in time: :class:`JetStreamError`), and
its outcome is put in the op's :class:`concurrent.futures.Future`, which the Trio
side waits on. An op whose future was cancelled before it was issued is skipped.
nats-py's errors become :class:`JetStreamError`; a stream at its byte limit is
:class:`JetStreamFull` (also a :class:`domain.errors.StorageFull`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from domain.errors import StorageFull
from storage.journal import JournalError, JournalUnavailable, Record
from storage.ownership import ClaimLost, SessionMoved, TakeOver

T = TypeVar("T")

# JetStream's "insufficient resources", "maximum bytes exceeded", "storage full".
FULL_CODES = (10047, 10077, 10078)
KIND = "Tj-Kind"  # header: the record's kind, decimal
ZLIB = "Tj-Zlib"  # header present: the payload is zlib-compressed
EXPECT = "Nats-Expected-Last-Subject-Sequence"
# JetStream's "wrong last sequence" (10071, or 10164 for an expected 0): the fence held.
WRONG_LAST = (10071, 10164)
# Record kinds of the journal's own, never returned by replay: an owner mark (written
# at a take-over) and a state record (a fenced copy of a state write).
OWNER_KIND, STATE_KIND = 65534, 65535
# A take-over's owner mark races the former owner's appends: each lost race reads
# only the new records and tries again (a former owner appends about once a second).
TAKE_OVER_ATTEMPTS = 20
BATCHED_FROM = 32  # a log longer than this is replayed through a consumer


class JetStreamError(JournalError):
    """A JetStream journal operation failed or was not acknowledged in time; nothing
    it was asked to make durable is known to be durable."""


class JetStreamUnavailable(JetStreamError, JournalUnavailable):
    """No answer in time, or no stream leader to answer (see JournalUnavailable)."""


class JetStreamFull(JetStreamError, StorageFull):
    """The journal stream is at its byte limit: wait and send it again."""


class JetStreamMoved(JetStreamError, SessionMoved):
    """The fence held: another instance wrote the session since this one did."""


class JetStreamClaimLost(JetStreamError, ClaimLost):
    """A take-over kept losing the race for the session's log."""


# -- keys <-> subject tokens -----------------------------------------------------------

def encode_key(key: str) -> str:
    """``org/session`` -> ``org.session``; ``_`` and ``.`` inside a segment are escaped
    (``_u``, ``_d``) since ``.`` separates NATS tokens. Reversible."""
    return ".".join(p.replace("_", "_u").replace(".", "_d") for p in key.split("/"))


def decode_key(tokens: str) -> str:
    parts = []
    for tok in tokens.split("."):
        out, i = [], 0
        while i < len(tok):
            if tok[i] == "_" and i + 1 < len(tok):
                out.append({"u": "_", "d": "."}.get(tok[i + 1], "?"))
                i += 2
            else:
                out.append(tok[i])
                i += 1
        parts.append("".join(out))
    return "/".join(parts)


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, nats.js.errors.APIError):
        text = str(getattr(exc, "description", "") or "").lower()
        code = getattr(exc, "err_code", None)
        return "maximum bytes" in text or "resource limits" in text or code in FULL_CODES
    return False


def _mapped(exc: BaseException, what: str) -> JetStreamError:
    if _is_full(exc):
        return JetStreamFull(f"journal {what}: the stream is full")
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return JetStreamUnavailable(f"journal {what}: not acknowledged in time")
    return JetStreamError(f"journal {what} failed: {type(exc).__name__}: {exc}")


async def guarded(what: str, coro: Awaitable[T]) -> T:
    """``await coro`` with nats-py's errors mapped to :class:`JetStreamError`."""
    try:
        return await coro
    except (JetStreamError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise _mapped(exc, what) from exc


@dataclass
class Op:
    """One write, created on the Trio side; ``result`` carries its outcome back."""

    key: str
    what: str  # "append" | "state" | "remove" | "take"
    payload: bytes = b""
    headers: dict[str, str] | None = None
    result: concurrent.futures.Future[Any] | None = None


def _settled(loop: asyncio.AbstractEventLoop, *futs: asyncio.Future[Any] | None
             ) -> asyncio.Future[None]:
    """A future resolved once every one of ``futs`` is done, whatever its outcome."""
    out: asyncio.Future[None] = loop.create_future()
    pending = [f for f in futs if f is not None and not f.done()]
    left = [len(pending)]

    def one(_: object) -> None:
        left[0] -= 1
        if left[0] == 0 and not out.done():
            out.set_result(None)

    if not pending:
        out.set_result(None)
    for f in pending:
        f.add_done_callback(one)
    return out


class AsyncJournal:
    """The connection, the stream and the bucket (see the module docstring)."""

    def __init__(self, *, servers: list[str], stream: str, subject_root: str, bucket: str,
                 replicas: int, max_bytes: int, timeout_s: float, fenced: bool = False,
                 max_age_s: float = 0.0, state_ttl_s: float = 0.0) -> None:
        self.servers, self.stream, self.root, self.bucket = servers, stream, subject_root, bucket
        self.replicas, self.max_bytes, self.timeout_s = replicas, max_bytes, timeout_s
        self.fenced = fenced
        # Retention (0: none): records older than max_age_s leave the stream (left
        # over by a session nobody finished), states older than state_ttl_s (an
        # ended session's kept summary) leave the bucket.
        self.max_age_s, self.state_ttl_s = max_age_s, state_ttl_s
        # Fencing: each key's last subject sequence as this instance knows it.
        self._last: dict[str, int] = {}
        self.nc: Any = None
        self.js: Any = None
        self.kv: Any = None
        self._inbox = ""
        self._next = 0
        self._acks: dict[str, asyncio.Future[int]] = {}
        self._chains: dict[str, tuple[asyncio.Future[None], asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def subject(self, key: str) -> str:
        return f"{self.root}.{encode_key(key)}"

    # -- lifecycle -----------------------------------------------------------------

    async def open(self, *, ready_timeout_s: float) -> None:
        """Connect, then create (or update) the stream and the bucket, retrying while
        the cluster has no JetStream leader yet, up to ``ready_timeout_s``."""
        self.nc = await guarded("connect", asyncio.wait_for(nats.connect(
            servers=self.servers, connect_timeout=2, reconnect_time_wait=0.25,
            max_reconnect_attempts=-1, allow_reconnect=True, name="telemetry-journal",
            error_cb=_ignore, disconnected_cb=_none, reconnected_cb=_none, closed_cb=_none),
            ready_timeout_s))
        self.js = self.nc.jetstream(timeout=self.timeout_s)
        # Publish acks come to one wildcard inbox, matched to their futures by token.
        # Not nats-py's publish_async: its reply handler raises (instead of failing
        # the future) on a 503 API error such as "maximum bytes exceeded", so the
        # caller would wait for its timeout and see no StorageFull.
        self._inbox = self.nc.new_inbox()
        await guarded("connect", self.nc.subscribe(f"{self._inbox}.*", cb=self._on_ack))
        stream = api.StreamConfig(
            name=self.stream, subjects=[f"{self.root}.>"], storage=api.StorageType.FILE,
            num_replicas=self.replicas, discard=api.DiscardPolicy.NEW,
            max_bytes=self.max_bytes, retention=api.RetentionPolicy.LIMITS,
            max_age=self.max_age_s or None)
        kv = api.KeyValueConfig(bucket=self.bucket, history=1, replicas=self.replicas,
                                storage=api.StorageType.FILE, ttl=self.state_ttl_s or None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout_s
        while True:
            try:
                try:
                    await self.js.add_stream(stream)
                except nats.js.errors.BadRequestError:  # exists with another config
                    await self.js.update_stream(stream)
                try:
                    self.kv = await self.js.create_key_value(kv)
                except nats.js.errors.BadRequestError:
                    # It exists with another configuration (an older retention): use
                    # it as it is rather than refuse to start.
                    self.kv = await self.js.key_value(self.bucket)
                return
            except Exception as exc:
                if loop.time() > deadline:
                    raise _mapped(exc, "setting up the stream") from exc
                await asyncio.sleep(0.25)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    async def delete_everything(self, *other_buckets: str) -> None:
        """Delete the stream and the bucket, and the other buckets that exist (tests,
        bench)."""
        await guarded("delete", self.js.delete_stream(self.stream))
        await guarded("delete", self.js.delete_key_value(self.bucket))
        for bucket in other_buckets:
            try:
                await self.js.delete_key_value(bucket)
            except nats.js.errors.NotFoundError:
                pass

    # -- writes ----------------------------------------------------------------------

    def submit(self, op: Op) -> None:
        """Start ``op`` behind the key's previous op (call on the loop, in call order)."""
        loop = asyncio.get_running_loop()
        prev = self._chains.get(op.key)
        issued: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._run(op, prev, issued))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        done = _settled(loop, prev[1] if prev else None, task)
        chain = (issued, done)
        self._chains[op.key] = chain

        def forget(_: object) -> None:
            if self._chains.get(op.key) is chain:
                del self._chains[op.key]

        done.add_done_callback(forget)

    async def _run(self, op: Op, prev: tuple[asyncio.Future[None], asyncio.Future[None]] | None,
                   issued: asyncio.Future[None]) -> None:
        assert op.result is not None
        try:
            if prev is not None:
                try:
                    pipelined = op.what == "append" and not self.fenced
                    await _settled(asyncio.get_running_loop(),
                                   prev[0] if pipelined else prev[1])
                except asyncio.CancelledError:  # closing before it was issued
                    if op.result.set_running_or_notify_cancel():
                        op.result.set_exception(JetStreamError("the journal closed"))
                    raise
            if not op.result.set_running_or_notify_cancel():
                return  # cancelled by its caller before it was issued
            # A take-over replays the whole log: one round trip per record.
            limit = self.timeout_s * (12 if op.what == "take" else 1)
            try:
                value = await asyncio.wait_for(self._issue(op, issued), limit)
            except asyncio.CancelledError:  # the journal is closing
                op.result.set_exception(JetStreamError("the journal closed"))
                raise
            except Exception as exc:
                op.result.set_exception(
                    exc if isinstance(exc, JetStreamError) else _mapped(exc, op.what))
            else:
                op.result.set_result(value)
        finally:
            if not issued.done():
                issued.set_result(None)

    async def _issue(self, op: Op, issued: asyncio.Future[None]) -> Any:
        if op.what == "append":
            await self._publish(op.key, op.payload, op.headers or {}, issued)
        elif op.what == "state":
            if self.fenced and op.key in self._last:
                await self._publish(op.key, op.payload, {KIND: str(STATE_KIND)}, None)
            await self.kv.put(encode_key(op.key), op.payload)
        elif op.what == "take":
            return await self._take_over(op.key)
        else:
            await self.js.purge_stream(self.stream, subject=self.subject(op.key))
            self._last.pop(op.key, None)
            try:
                await self.kv.purge(encode_key(op.key))
            except nats.js.errors.KeyNotFoundError:
                pass
        return None

    async def _publish(self, key: str, payload: bytes, headers: dict[str, str],
                       issued: asyncio.Future[None] | None) -> int:
        """Publish one message of ``key`` and wait for its ack (fenced in fleet mode);
        returns its stream sequence."""
        self._next += 1
        token = str(self._next)
        ack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[token] = ack
        headers = {**headers, "Nats-Expected-Stream": self.stream}
        if self.fenced:
            headers[EXPECT] = str(self._last.get(key, 0))
        try:
            await self.nc.publish(self.subject(key), payload,
                                  reply=f"{self._inbox}.{token}", headers=headers)
            if issued is not None:
                issued.set_result(None)
            seq = await ack
        finally:
            self._acks.pop(token, None)
        if self.fenced:
            self._last[key] = seq
        return seq

    async def _take_over(self, key: str) -> TakeOver:
        """Replay ``key``, then append an owner mark fenced on the last record read;
        again if another writer got in between (see :mod:`storage.ownership`)."""
        log = await self._read_log(key)
        for _ in range(TAKE_OVER_ATTEMPTS):
            self._last[key] = log.last
            if log.last == 0:
                return TakeOver(log.records, log.state)  # no log: nothing to fence against
            try:
                await self._publish(key, b"", {KIND: str(OWNER_KIND)}, None)
            except JetStreamMoved:
                # The former owner wrote since: read just what it added, mark again.
                await self._read_each(self.subject(key), log.last + 1, log)
                continue
            return TakeOver(log.records, log.state)
        self._last.pop(key, None)
        raise JetStreamClaimLost("journal take-over: other writers kept appending")

    async def _on_ack(self, msg: Any) -> None:
        ack = self._acks.pop(msg.subject.rsplit(".", 1)[-1], None)
        if ack is None or ack.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            ack.set_exception(JetStreamUnavailable("journal append: no stream answered"))
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            ack.set_exception(JetStreamError("journal append: unreadable acknowledgement"))
            return
        err = resp.get("error") if isinstance(resp, dict) else {"description": "bad ack"}
        if not err:
            ack.set_result(int(resp.get("seq") or 0))
        elif err.get("err_code") in WRONG_LAST:
            ack.set_exception(JetStreamMoved("journal write refused: the session was "
                                             "taken over by another instance"))
        elif err.get("err_code") in FULL_CODES or "maximum bytes" in str(err.get("description")):
            ack.set_exception(JetStreamFull("journal append: the stream is full"))
        else:
            ack.set_exception(JetStreamError(
                f"journal append refused: {err.get('err_code')} {err.get('description')}"))

    # -- reads -------------------------------------------------------------------------

    async def state(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await guarded("state", self.kv.get(encode_key(key)))
        except JetStreamError as exc:
            if isinstance(exc.__cause__, nats.js.errors.KeyNotFoundError):
                return None
            raise
        return _state(entry.value or b"")

    async def replay(self, key: str) -> tuple[list[Record], int]:
        """``key``'s records in stream order, and how many were unreadable (skipped)."""
        log = await self._read_log(key)
        return log.records, log.bad

    async def _read_log(self, key: str) -> _Log:
        """``key``'s records (the journal's own kinds left out), the unreadable count,
        the subject's last sequence (0: no messages) and its last state record."""
        subject = self.subject(key)
        info = await guarded("replay", self.js.stream_info(self.stream,
                                                           subjects_filter=subject))
        if not (info.state.subjects or {}).get(subject):
            return _Log()
        # One leader-served get per record (read-your-writes after a fail-over, no
        # consumer to create and clean up). A batched get is the speed-up for long
        # sessions' take-over (a later step).
        count = int((info.state.subjects or {}).get(subject) or 0)
        log = _Log()
        first = max(1, int(info.state.first_seq or 1))
        if count > BATCHED_FROM:
            try:
                await self._read_pushed(subject, log)
                if log.seen >= count:
                    return log
            except JetStreamError:
                pass
            # A consumer can fail to start or stall while the cluster re-elects after
            # a node loss, and one placed on a replica still catching up (a node just
            # restarted) ends early: the leader's gets carry on from where it stopped.
            first = log.last + 1 if log.last else first
        await self._read_each(subject, first, log)
        return log

    async def _read_each(self, subject: str, seq: int, log: _Log) -> None:
        """One leader-served get per record (read-your-writes after a fail-over, no
        consumer to create): the cheaper way for a short log."""
        while True:
            try:
                raw = await self.js.get_msg(self.stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return
            except Exception as exc:
                raise _mapped(exc, "replay") from exc
            log.add(int(raw.seq), raw)
            seq = int(raw.seq) + 1

    async def _read_pushed(self, subject: str, log: _Log) -> None:
        """A long log through an ordered push consumer (created on the stream's leader,
        flow-controlled, deleted on leaving): a take-over of a 30-minute session in
        about a fifth of the time of one get per record."""
        sub = await guarded("replay", self.js.subscribe(
            subject, stream=self.stream, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL))
        try:
            while True:
                msg = await guarded("replay", sub.next_msg(timeout=self.timeout_s))
                meta = msg.metadata
                log.add(int(meta.sequence.stream), msg)
                if not meta.num_pending:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the consumer expires by itself
                pass

    async def sessions(self) -> list[str]:
        """Keys with records or a state. The bucket's keys are listed through a
        consumer, which a replica still catching up may serve: right after a node
        restart the list can lag (start-up recovery of the spool's kind uses it; fleet
        mode does not)."""
        info = await guarded("sessions", self.js.stream_info(
            self.stream, subjects_filter=f"{self.root}.>"))
        prefix = len(self.root) + 1
        keys = {decode_key(s[prefix:]) for s, n in (info.state.subjects or {}).items() if n}
        try:
            keys.update(decode_key(k) for k in await guarded("sessions", self.kv.keys()))
        except JetStreamError as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NoKeysError):
                raise
        return sorted(keys)


class _Log:
    """What a replay gathers: records, unreadable count, last sequence, last state."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.bad = 0
        self.seen = 0  # messages read, whatever their kind
        self.last = 0
        self.state: dict[str, Any] | None = None

    def add(self, seq: int, msg: Any) -> None:
        self.seen += 1
        self.last = seq
        rec = _record(msg)
        if rec is None:
            self.bad += 1
        elif rec.kind == STATE_KIND:
            self.state = _state(rec.payload)
        elif rec.kind != OWNER_KIND:
            self.records.append(rec)


def _state(data: bytes) -> dict[str, Any] | None:
    try:
        state = json.loads(data or b"")
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def _record(msg: Any) -> Record | None:
    try:
        headers = msg.headers or {}
        kind = int(headers[KIND])
        data = zlib.decompress(msg.data) if ZLIB in headers else bytes(msg.data or b"")
        return Record(kind, data)
    except (KeyError, ValueError, zlib.error):
        return None


def encode(kind: int, payload: bytes, level: int) -> tuple[bytes, dict[str, str]]:
    """The stored payload and headers of a record: compressed if that is smaller."""
    headers = {KIND: str(kind)}
    if level:
        packed = zlib.compress(payload, level)
        if len(packed) < len(payload):
            headers[ZLIB] = "1"
            return packed, headers
    return payload, headers


async def _ignore(exc: Exception) -> None:
    return None


async def _none() -> None:
    return None

