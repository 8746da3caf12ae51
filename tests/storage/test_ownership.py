"""Fleet mode's ownership on a real 3-node R3 JetStream cluster: fenced journal writes
(a former owner can acknowledge nothing after a take-over) and the ownership records
(compare-and-set claims, heartbeats, release, survey). See storage/ownership.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from storage.jetstream import JetStreamJournal, open_jetstream_journal
from storage.jetstream_owners import JetStreamOwnership
from storage.journal import Record
from storage.ownership import ClaimLost, SessionMoved
from tests.support.nats import NatsCluster, unique_names

KEY = "org-a/sess-1"


@contextlib.asynccontextmanager
async def two_instances(cluster: NatsCluster, lease_s: float = 5.0
                        ) -> AsyncIterator[tuple[tuple[JetStreamJournal, JetStreamOwnership],
                                                 tuple[JetStreamJournal, JetStreamOwnership]]]:
    """Two instances' journals on one stream (each its own connection and bridge)."""
    names = unique_names()
    bucket = "OWN_" + names["stream"]
    async with open_jetstream_journal(cluster.urls, fenced=True, **names) as a, \
            open_jetstream_journal(cluster.urls, fenced=True, **names) as b:
        yield ((a, await a.open_ownership("inst-a", lease_s, bucket)),
               (b, await b.open_ownership("inst-b", lease_s, bucket)))
        await a.delete_everything(bucket)


async def test_a_former_owner_cannot_write_after_a_take_over(nats_cluster: NatsCluster) -> None:
    async with two_instances(nats_cluster) as ((a, _), (b, _)):
        await a.append(KEY, 1, b"start")
        await a.append(KEY, 2, b"batch-0")
        taken = await b.take_over(KEY)
        assert taken.records == [Record(1, b"start"), Record(2, b"batch-0")]
        assert taken.state is None
        # A still believes it owns the session: every write of its is refused now.
        with pytest.raises(SessionMoved):
            await a.append(KEY, 2, b"batch-1 via a")
        with pytest.raises(SessionMoved):
            await a.set_state(KEY, {"step": "upload", "end_reason": "idle_timeout"})
        await b.append(KEY, 2, b"batch-1 via b")
        await b.set_state(KEY, {"step": "upload", "end_reason": "client_end"})
        replay = await b.replay(KEY)
        assert replay == [Record(1, b"start"), Record(2, b"batch-0"), Record(2, b"batch-1 via b")]
        # The state is in the log too, where the next take-over reads it.
        again = await a.take_over(KEY)
        assert again.records == replay
        assert again.state == {"step": "upload", "end_reason": "client_end"}
        with pytest.raises(SessionMoved):
            await b.append(KEY, 2, b"batch-2 via b")


async def test_a_new_session_cannot_start_over_an_existing_log(
        nats_cluster: NatsCluster) -> None:
    async with two_instances(nats_cluster) as ((a, _), (b, _)):
        await a.append(KEY, 1, b"start")
        # B never replayed the key: its first write expects an empty log, and fails.
        with pytest.raises(SessionMoved):
            await b.append(KEY, 1, b"start again")
        assert await a.replay(KEY) == [Record(1, b"start")]


async def test_racing_appends_and_a_take_over_lose_no_acknowledged_record(
        nats_cluster: NatsCluster) -> None:
    """A keeps appending while B takes over: every append A was told succeeded is in
    B's replay, and A's appends after it fail."""
    async with two_instances(nats_cluster) as ((a, _), (b, _)):
        await a.append(KEY, 1, b"start")
        acked: list[bytes] = []
        refused = 0

        async def writer() -> None:
            nonlocal refused
            for i in range(200):
                body = f"batch-{i}".encode()
                try:
                    await a.append(KEY, 2, body)
                except SessionMoved:
                    refused += 1
                    return
                acked.append(body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(0.05)
            taken = await b.take_over(KEY)
        assert refused == 1 or len(acked) == 200
        payloads = [r.payload for r in taken.records[1:]]
        assert payloads == acked  # nothing acknowledged after the take-over


async def test_claims_heartbeats_release_and_survey(nats_cluster: NatsCluster) -> None:
    async with two_instances(nats_cluster, lease_s=2.0) as ((_, oa), (_, ob)):
        await oa.heartbeat()
        await ob.heartbeat()
        assert await oa.claim(KEY, steal=False)
        assert (await oa.owner(KEY)).instance == "inst-a"  # type: ignore[union-attr]
        # B may not take a live owner's session unless it steals it.
        assert not await ob.claim(KEY, steal=False)
        assert await ob.claim(KEY, steal=True)
        survey = await oa.survey()
        assert survey.owners[KEY].instance == "inst-b"
        assert survey.alive == {"inst-a", "inst-b"}
        assert not survey.orphaned(KEY, trio.current_time(), 60)
        # A no longer owns it: its release and forget change nothing.
        await oa.release(KEY)
        await oa.forget(KEY)
        assert (await ob.owner(KEY)).instance == "inst-b"  # type: ignore[union-attr]
        # B leaves: its sessions are orphans, and A may claim them without stealing.
        await ob.leave()
        survey = await oa.survey()
        assert "inst-b" not in survey.alive and survey.orphaned(KEY, 0, 60)
        assert await oa.claim(KEY, steal=False)
        await oa.release(KEY)
        released = await ob.owner(KEY)
        assert released is not None and released.instance == ""
        await oa.forget(KEY)  # not A's any more: released
        assert await ob.owner(KEY) is not None


async def test_an_expired_heartbeat_orphans_the_sessions(nats_cluster: NatsCluster) -> None:
    async with two_instances(nats_cluster, lease_s=0.5) as ((_, oa), (_, ob)):
        await oa.heartbeat()
        assert await oa.claim(KEY, steal=False)
        await trio.sleep(0.7)  # real time: the lease is wall-clock, on the server side
        assert (await ob.survey()).orphaned(KEY, 0, 60)
        assert await ob.claim(KEY, steal=False)


async def test_concurrent_claims_one_wins(nats_cluster: NatsCluster) -> None:
    async with two_instances(nats_cluster) as ((_, oa), (_, ob)):
        results: list[bool | str] = []

        async def claim(o: JetStreamOwnership) -> None:
            try:
                results.append(await o.claim(KEY, steal=False))
            except ClaimLost:
                results.append("lost")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, oa)
            nursery.start_soon(claim, ob)
        owner = await oa.owner(KEY)
        assert owner is not None and owner.instance in ("inst-a", "inst-b")
        assert results.count(True) >= 1


async def test_a_long_log_is_replayed_whole_and_in_order(nats_cluster: NatsCluster) -> None:
    """Past BATCHED_FROM records the replay goes through a consumer: same answer."""
    async with two_instances(nats_cluster) as ((a, _), (b, _)):
        sent = [Record(2, f"batch-{i}".encode() * (i % 7 + 1)) for i in range(100)]
        await a.append(KEY, 1, b"start")
        for i, rec in enumerate(sent):
            await a.append(KEY, rec.kind, rec.payload, compress=bool(i % 2))
            if i == 50:
                await a.set_state(KEY, {"step": "upload", "end_reason": "admin"})
        taken = await b.take_over(KEY)
        assert taken.records == [Record(1, b"start"), *sent]
        assert taken.state == {"step": "upload", "end_reason": "admin"}
        assert await b.replay(KEY) == taken.records
        await b.append(KEY, 2, b"after")  # B's fence is the owner mark it wrote


async def test_retention_bounds_leftovers_and_a_changed_one_still_opens(
        nats_cluster: NatsCluster) -> None:
    names = unique_names()
    async with open_jetstream_journal(nats_cluster.urls, fenced=True, max_age_s=86400,
                                      state_ttl_s=3600, **names) as journal:
        client = journal._client
        info = await journal._bridge.call(lambda: client.js.stream_info(client.stream))
        assert info.config.max_age == 86400
        status = await journal._bridge.call(client.kv.status)
        assert status.ttl == 3600
    # A later start with another retention: the stream follows it, the bucket is used
    # as it is (refusing to start would be worse).
    async with open_jetstream_journal(nats_cluster.urls, fenced=True, max_age_s=2 * 86400,
                                      state_ttl_s=60, **names) as journal:
        client = journal._client
        info = await journal._bridge.call(lambda: client.js.stream_info(client.stream))
        assert info.config.max_age == 2 * 86400
        await journal.set_state("org-a/s-1", {"step": "live"})
        assert await journal.state("org-a/s-1") == {"step": "live"}
        await journal.delete_everything()
