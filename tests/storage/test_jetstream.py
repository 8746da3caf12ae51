"""The JetStream journal beyond the shared contract (tests/storage/test_journal_contract.py):
both asyncio bridges, node failures on a real 3-node R3 cluster, a cluster that is
down, cancellation, a full stream, and the key encoding."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import StorageFull
from storage.jetstream import (
    JetStreamError,
    JetStreamFull,
    JetStreamJournal,
    open_jetstream_journal,
)
from storage.jetstream_bridge import BRIDGES
from storage.jetstream_client import decode_key, encode_key
from storage.journal import JournalError, JournalUnavailable, Record
from tests.support.nats import NatsCluster, temporary_cluster, unique_names


@pytest.fixture
def private_cluster() -> Iterator[NatsCluster]:
    """A cluster of this test's own, for tests that take the whole cluster down."""
    with temporary_cluster() as cluster:
        yield cluster


async def append_retrying(journal: JetStreamJournal, key: str, record: Record) -> None:
    """What an actor does with a failed append (503, the client sends it again)."""
    while True:
        try:
            await journal.append(key, record.kind, record.payload)
            return
        except JetStreamError:
            await trio.sleep(0.2)


async def read_retrying(read: Any) -> Any:
    """A read right after a node loss may time out while the stream or the bucket
    elects a new leader; the service answers 503 then, and the client asks again."""
    while True:
        try:
            return await read()
        except JetStreamError:
            await trio.sleep(0.2)


def is_subsequence(part: list[Record], whole: list[Record]) -> bool:
    it = iter(whole)
    return all(any(r == w for w in it) for r in part)


async def stream_leader(journal: JetStreamJournal) -> str:
    client = journal._client
    info = await journal._bridge.call(lambda: client.js.stream_info(client.stream))
    return str(info.cluster.leader)


@pytest.mark.parametrize("bridge", BRIDGES)
async def test_both_bridges_append_replay_state_remove(nats_cluster: NatsCluster,
                                                       bridge: str) -> None:
    async with open_jetstream_journal(nats_cluster.urls, bridge=bridge,
                                      **unique_names()) as journal:
        try:
            records = [Record(i, os.urandom(2000)) for i in range(30)]
            async with trio.open_nursery() as nursery:
                for s in range(4):
                    async def one(key: str = f"org-a/s-{s}") -> None:
                        for r in records:
                            await journal.append(key, r.kind, r.payload, compress=False)
                    nursery.start_soon(one)
            await journal.set_state("org-a/s-0", {"step": "upload"})
            for s in range(4):
                assert await journal.replay(f"org-a/s-{s}") == records
            assert await journal.state("org-a/s-0") == {"step": "upload"}
            await journal.remove("org-a/s-0")
            assert await journal.sessions() == ["org-a/s-1", "org-a/s-2", "org-a/s-3"]
        finally:
            await journal.delete_everything()


async def test_a_killed_node_loses_no_acknowledged_record_and_appends_carry_on(
        nats_cluster: NatsCluster) -> None:
    names = [n.name for n in nats_cluster.nodes]
    async with open_jetstream_journal(nats_cluster.urls, timeout_s=3,
                                      **unique_names()) as journal:
        killed: int | None = None
        try:
            before = [Record(1, os.urandom(4000)) for _ in range(50)]
            for r in before:
                await journal.append("org-a/s-1", r.kind, r.payload)
            await journal.set_state("org-a/s-1", {"step": "live"})
            # The worst node to lose: the stream's leader.
            killed = names.index(await stream_leader(journal))
            nats_cluster.kill(killed)
            with trio.fail_after(60):
                after = [Record(2, os.urandom(4000)) for _ in range(20)]
                for r in after:
                    await append_retrying(journal, "org-a/s-1", r)
                got = await read_retrying(lambda: journal.replay("org-a/s-1"))
                state = await read_retrying(lambda: journal.state("org-a/s-1"))
            assert got[:50] == before  # acknowledged before the kill: all there, in order
            assert is_subsequence(after, got[50:])  # a retried append may be there twice
            assert state == {"step": "live"}

            # The node comes back and catches up (its /healthz answers 200 once its
            # streams are current): with another node down, it is part of the quorum
            # that acknowledges and answers.
            await nats_cluster.restart(killed)
            other = (killed + 1) % 3
            nats_cluster.kill(other)
            killed_again = other
            with trio.fail_after(60):
                last = Record(3, b"after the return")
                await append_retrying(journal, "org-a/s-1", last)
                final = await read_retrying(lambda: journal.replay("org-a/s-1"))
            assert final[:50] == before and final[-1] == last
            assert is_subsequence(after, final[50:-1])
            await nats_cluster.restart(killed_again)
            killed = None
        finally:
            if killed is not None:
                await nats_cluster.restart(killed)
            for i, node in enumerate(nats_cluster.nodes):
                if node.proc is None or node.proc.poll() is not None:
                    await nats_cluster.restart(i)
            with trio.fail_after(60):
                while True:
                    try:
                        await journal.delete_everything()
                        break
                    except JetStreamError:
                        await trio.sleep(0.5)


async def test_a_cluster_that_is_down_fails_operations_in_bounded_time(
        private_cluster: NatsCluster) -> None:
    async with open_jetstream_journal(private_cluster.urls, timeout_s=2,
                                      **unique_names()) as journal:
        await journal.append("org-a/s-1", 1, b"kept")
        private_cluster.stop()
        with trio.fail_after(30):  # stops a hang; the operations fail after timeout_s
            # "unavailable": the service logs it as one WARNING line, no traceback
            with pytest.raises(JournalUnavailable):
                await journal.append("org-a/s-1", 1, b"lost")
            with pytest.raises(JournalError):
                await journal.set_state("org-a/s-1", {"step": "x"})
            with pytest.raises(JournalError):
                await journal.replay("org-a/s-1")
            with pytest.raises(JournalError):
                await journal.sessions()


async def test_connecting_to_no_cluster_fails_in_bounded_time() -> None:
    from tests.support.ports import free_port

    with trio.fail_after(30), pytest.raises(JetStreamError):
        async with open_jetstream_journal([f"nats://127.0.0.1:{free_port()}"],
                                          ready_timeout_s=2, **unique_names()):
            pass


async def test_cancelled_appends_raise_cancelled_and_leave_only_whole_records(
        nats_cluster: NatsCluster) -> None:
    async with open_jetstream_journal(nats_cluster.urls, **unique_names()) as journal:
        try:
            payloads = {os.urandom(20000) for _ in range(60)}
            acked: list[bytes] = []
            cancelled = 0

            async def one(p: bytes, scope_s: float) -> None:
                nonlocal cancelled
                with trio.move_on_after(scope_s) as scope:
                    await journal.append("org-a/s-1", 1, p, compress=False)
                    acked.append(p)
                if scope.cancelled_caught:
                    cancelled += 1

            async with trio.open_nursery() as nursery:
                for i, p in enumerate(payloads):
                    nursery.start_soon(one, p, 0 if i % 2 else 10)
            assert cancelled >= 1  # a deadline already passed cancels the call
            got = await journal.replay("org-a/s-1")
            assert all(r.payload in payloads for r in got)  # whole records only
            assert set(acked) <= {r.payload for r in got}
            await journal.append("org-a/s-1", 2, b"later")
            assert (await journal.replay("org-a/s-1"))[-1] == Record(2, b"later")
        finally:
            await journal.delete_everything()


async def test_a_full_stream_is_storage_full(nats_cluster: NatsCluster) -> None:
    async with open_jetstream_journal(nats_cluster.urls, max_bytes=200_000,
                                      **unique_names()) as journal:
        try:
            with trio.fail_after(30), pytest.raises(JetStreamFull) as caught:
                for _ in range(100):
                    await journal.append("org-a/s-1", 1, os.urandom(20_000), compress=False)
            assert isinstance(caught.value, StorageFull)
            assert isinstance(caught.value, JournalError)
        finally:
            await journal.delete_everything()


segment = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(st.lists(segment, min_size=1, max_size=4))
def test_key_encoding_is_reversible_and_a_valid_subject(parts: list[str]) -> None:
    key = "/".join(parts)
    tokens = encode_key(key)
    assert decode_key(tokens) == key
    assert tokens.count(".") == len(parts) - 1
    assert all(tok and not set(tok) & set("*> \t") for tok in tokens.split("."))
