"""The Journal contract (storage/journal.py), held against every adapter: the local
spool and the JetStream journal on a real 3-node R3 cluster run the same tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from storage.jetstream import open_jetstream_journal
from storage.journal import Journal, Record
from storage.spool import Spool
from tests.support.nats import NatsCluster, unique_names


@pytest.fixture(params=["spool", "jetstream"])
def adapter(request: pytest.FixtureRequest) -> NatsCluster | None:
    """None for the spool; the cluster for JetStream (a sync fixture: the cluster is
    started outside the test's Trio run)."""
    return request.getfixturevalue("nats_cluster") if request.param == "jetstream" else None


@pytest.fixture
async def journal(adapter: NatsCluster | None, tmp_path: Path) -> AsyncIterator[Journal]:
    if adapter is None:
        spool = Spool(tmp_path / "spool")
        async with trio.open_nursery() as nursery:
            await nursery.start(spool.run)
            yield spool
            nursery.cancel_scope.cancel()
        return
    async with open_jetstream_journal(adapter.urls, replicas=3, **unique_names()) as js:
        try:
            yield js
        finally:
            await js.delete_everything()


async def test_append_then_replay_in_order(journal: Journal) -> None:
    records = [Record(k % 3, os.urandom(100 + k)) for k in range(20)]
    for r in records:
        await journal.append("org-a/s-1", r.kind, r.payload)
    assert await journal.replay("org-a/s-1") == records
    assert await journal.replay("org-a/s-2") == []


async def test_compress_flag_round_trips(journal: Journal) -> None:
    text = b"squat " * 2000
    noise = os.urandom(5000)
    await journal.append("org-a/s-1", 1, text)
    await journal.append("org-a/s-1", 2, noise, compress=False)
    await journal.append("org-a/s-1", 3, noise)  # does not shrink: stored as is
    assert await journal.replay("org-a/s-1") == [Record(1, text), Record(2, noise),
                                                 Record(3, noise)]


async def test_state_set_get_replace(journal: Journal) -> None:
    assert await journal.state("org-a/s-1") is None
    await journal.set_state("org-a/s-1", {"step": "upload", "n": 1})
    assert await journal.state("org-a/s-1") == {"step": "upload", "n": 1}
    await journal.set_state("org-a/s-1", {"step": "publish"})
    assert await journal.state("org-a/s-1") == {"step": "publish"}


async def test_sessions_lists_logs_and_states_and_ended_keys(journal: Journal) -> None:
    assert await journal.sessions() == []
    await journal.append("org-b/s.2", 1, b"x")
    await journal.append("org_a/s-1", 1, b"x")
    await journal.set_state("ended/org-a/s-0", {"summary": {"a": 1}})
    await journal.set_state("org_a/s-1", {"step": "upload"})
    assert await journal.sessions() == ["ended/org-a/s-0", "org-b/s.2", "org_a/s-1"]
    assert await journal.state("ended/org-a/s-0") == {"summary": {"a": 1}}
    assert await journal.replay("ended/org-a/s-0") == []


async def test_remove_deletes_log_and_state(journal: Journal) -> None:
    await journal.append("org-a/s-1", 1, b"one")
    await journal.set_state("org-a/s-1", {"step": "publish"})
    await journal.append("org-a/s-2", 1, b"two")
    await journal.remove("org-a/s-1")
    assert await journal.replay("org-a/s-1") == []
    assert await journal.state("org-a/s-1") is None
    assert await journal.sessions() == ["org-a/s-2"]
    await journal.remove("org-a/s-1")  # removing nothing is fine
    await journal.append("org-a/s-1", 2, b"again")  # a removed key starts over
    assert await journal.replay("org-a/s-1") == [Record(2, b"again")]


async def test_keys_that_differ_only_in_escaped_characters_stay_apart(
        journal: Journal) -> None:
    keys = ["o/a.b", "o/a_b", "o/a_db", "o/a-b", "o.a/b", "o/a/b"]
    for i, key in enumerate(keys):
        await journal.append(key, i, key.encode())
    for i, key in enumerate(keys):
        assert await journal.replay(key) == [Record(i, key.encode())]
    assert await journal.sessions() == sorted(keys)


async def test_many_keys_at_once_keep_each_keys_order(journal: Journal) -> None:
    expected: dict[str, list[Record]] = {}

    async def session(s: int) -> None:
        key = f"org-c/s-{s}"
        expected[key] = [Record(1, f"{s}:{i}".encode() * 50) for i in range(15)]
        for r in expected[key]:
            await journal.append(key, r.kind, r.payload)
        await journal.set_state(key, {"last": 14})

    async with trio.open_nursery() as nursery:
        for s in range(40):
            nursery.start_soon(session, s)
    for key, records in expected.items():
        assert await journal.replay(key) == records
        assert await journal.state(key) == {"last": 14}


async def test_unawaited_operations_of_one_key_take_effect_in_call_order(
        journal: Journal) -> None:
    """Calls started one after another without awaiting each (the contract is call
    order, not completion order): appends, a state, a remove, appends again."""
    calls = [("append", b"a"), ("append", b"b"), ("state", {"n": 1}), ("remove", None),
             ("append", b"c"), ("state", {"n": 2}), ("append", b"d")]

    async with trio.open_nursery() as nursery:
        for what, arg in calls:
            if what == "append":
                nursery.start_soon(journal.append, "org-a/s-1", 1, arg)
            elif what == "state":
                nursery.start_soon(journal.set_state, "org-a/s-1", arg)
            else:
                nursery.start_soon(journal.remove, "org-a/s-1")
            await trio.testing.wait_all_tasks_blocked()  # made (and waiting) before the next
    assert await journal.replay("org-a/s-1") == [Record(1, b"c"), Record(1, b"d")]
    assert await journal.state("org-a/s-1") == {"n": 2}


async def test_bad_keys_and_kinds_are_refused(journal: Journal) -> None:
    for key in ("", "a/b/c/d/e", "org/../x", "org/s 1", "org/s*", "org/>"):
        with pytest.raises(ValueError):
            await journal.append(key, 1, b"x")
    with pytest.raises(ValueError):
        await journal.append("org/s", 70000, b"x")
