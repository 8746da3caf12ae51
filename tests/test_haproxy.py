"""The router's request correlation and log privacy (deploy/haproxy/haproxy.cfg).

The shipped file is checked by the real ``haproxy -c``; then the real HAProxy runs it,
with only its listen address, backend servers and global limits changed for loopback,
in front of the real service: its log lines must carry a route in place of the path
(no session id, no query), a truncated client address and the request id the service
logged, and the service must see the browser's address through the router's
``X-Forwarded-For``. Without the ``haproxy`` binary these tests fail and say how to
install it (as tests/test_deploy.py does)."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from domain.pose_batch import CONTENT_TYPE
from telemetry import logs
from telemetry.asgi import parse_networks
from telemetry.config import Settings
from tests.support.payloads import batch_body, session_token
from tests.support.ports import free_port
from tests.support.processes import running_process
from tests.support.service import running_service

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
INSTALL_HINT = ("haproxy is not installed; install it (Debian/Ubuntu: "
                "`apt-get install -y haproxy`) and run again")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")


def haproxy_binary() -> str:
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.fail(INSTALL_HINT)
    return binary


def config_lines() -> list[str]:
    """The shipped file's directives, comments dropped."""
    out = []
    for raw in CFG.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_the_shipped_config_passes_haproxy_check() -> None:
    done = subprocess.run([haproxy_binary(), "-c", "-f", str(CFG)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_log_format_leaves_paths_out() -> None:
    lines = config_lines()
    assert "option httplog" not in lines  # its request line is the raw path
    (fmt,) = [x for x in lines if x.startswith("log-format ")]
    # every %-variable of the format, with its {options} dropped
    used = set(re.findall(r"%(?:\{[^}]*\})?(\[[^\]]*\]|[A-Za-z]+)", fmt))
    # r / HU / HP / HQ: request line, URI, path, query; hr, CC: captured headers and
    # cookie; ci: the full client IP
    assert not used & {"r", "HU", "HP", "HQ", "hr", "CC", "ci"}, used
    assert not [v for v in used if v.startswith(("[path", "[url", "[capture", "[query"))]
    assert {"[var(txn.route)]", "[src,ipmask(24,48)]", "[var(txn.request_id)]"} <= used
    assert "option forwardfor" in lines
    assert any(x.startswith("unique-id-format ") for x in lines)
    assert any(x.startswith("http-request set-header X-Request-Id %[unique-id]") for x in lines)


def loopback_config(listen: int, backend: int) -> str:
    """The shipped config, listening on ``listen`` and forwarding to one server on
    ``backend``: no DNS discovery, runtime socket or production connection limit."""
    out: list[str] = []
    skipping = False
    for raw in CFG.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith(".if"):
            skipping = True
            continue
        if line.startswith(".endif"):
            skipping = False
            out.append(f"    server tel1 127.0.0.1:{backend}")
            continue
        if skipping or line.startswith(("stats socket", "server-template", "maxconn")):
            continue
        if line == "bind :8080":
            raw = f"    bind 127.0.0.1:{listen}"
        out.append(raw)
    text = "\n".join(out) + "\n"
    assert f"bind 127.0.0.1:{listen}" in text and f"127.0.0.1:{backend}" in text
    return text


@asynccontextmanager
async def running_router(backend: int, tmp: Path) -> AsyncIterator[tuple[int, list[str]]]:
    """HAProxy in the foreground; yields its port and the log lines read so far."""
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(loopback_config(port, backend), encoding="utf-8")
    async with running_process([haproxy_binary(), "-db", "-f", str(cfg)], any_answer=True,
                               ready_url=f"http://127.0.0.1:{port}/router/healthz") as lines:
        yield port, lines


async def test_router_correlates_and_logs_no_ids(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="telemetry")
    # what logs.configure puts on the service's handler: request_id on each line
    caplog.handler.addFilter(logs.RequestContextFilter())
    cfg = dataclasses.replace(settings, trusted_proxies=parse_networks("127.0.0.0/8"))
    async with running_service(cfg) as svc, running_router(svc.port, tmp_path) as (port, log):
        tok = session_token(cfg, session_id="sess-secret-9")
        auth = {"Authorization": f"Bearer {tok}"}
        # the ALB's line: the browser's address
        xff = {"X-Forwarded-For": "203.0.113.77"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
            fresh = await c.post("/v1/pose/frames", content=batch_body(0), headers={
                **auth, **xff, "Content-Type": CONTENT_TYPE})
            kept = await c.post("/v1/sessions/sess-secret-9/end?patient=p-secret",
                                headers={**auth, **xff, "X-Request-Id": "portal-req-1"})
            unsafe = await c.get("/v1/nothing/sess-secret-9",
                                 headers={**xff, "X-Request-Id": "two words"})
            twice = await c.get("/v1/healthz", headers=[("X-Request-Id", "a-1"),
                                                        ("X-Request-Id", "a-2")])
        for _ in range(500):  # a line is written as each transaction ends; 10 s at most
            if len([x for x in log if " rid=" in x]) >= 4:
                break
            await trio.sleep(0.02)

    assert (fresh.status_code, kept.status_code, unsafe.status_code) == (202, 200, 404)
    rid = {"fresh": fresh.headers["x-request-id"], "kept": kept.headers["x-request-id"],
           "unsafe": unsafe.headers["x-request-id"], "twice": twice.headers["x-request-id"]}
    assert UUID.fullmatch(rid["fresh"]) and UUID.fullmatch(rid["unsafe"])
    assert UUID.fullmatch(rid["twice"])  # two ids are one too many: replaced
    assert rid["kept"] == "portal-req-1"

    # The service logged under the router's ids, and saw the browser's address.
    service_rids = {getattr(r, "request_id", None) for r in caplog.records}
    assert set(rid.values()) <= service_rids
    refused = [r for r in caplog.records if getattr(r, "request_id", None) == rid["unsafe"]
               and r.getMessage() == "request"]
    assert [r.client for r in refused] == ["203.0.113.0"]  # type: ignore[attr-defined]

    routed = [x for x in log if " rid=" in x]
    text = "\n".join(log)
    for secret in ("sess-secret", "p-secret", "patient", "203.0.113.77"):
        assert secret not in text, secret
    # The client address is truncated in request lines (start-up warnings may name
    # the loopback backend, which is no client's).
    assert not any("127.0.0.1" in x for x in routed)
    by_rid = {x.rsplit(" rid=", 1)[1]: x for x in routed}
    assert 'POST "/v1/pose/frames" HTTP/1.1' in by_rid[rid["fresh"]]
    assert 'POST "/v1/sessions/<session_id>/end" HTTP/1.1' in by_rid[rid["kept"]]
    assert 'GET "unmatched" HTTP/1.1' in by_rid[rid["unsafe"]]
    assert all(x.startswith("127.0.0.0 ") for x in routed)
