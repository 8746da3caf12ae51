"""Structured logs of the running service: one JSON object per line, a request id and the
session pseudonym on every line of a request, levels that mean something, no personal data.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.pose_batch import CONTENT_TYPE
from domain.privacy import Pseudonymiser
from telemetry import logs
from telemetry.config import Settings
from tests.support.payloads import admin_token, batch_body, session_token
from tests.support.service import running_service

ORG, SESSION, PATIENT = "org-private", "sess-private", "patient-private"
ROOT = Path(__file__).resolve().parents[2]


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        raw = self.stream.getvalue().splitlines()
        return [json.loads(line) for line in raw]  # every line is one JSON object

    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def captured() -> Iterator[Captured]:
    """The service's own JSON logging (``logs.configure``) into a buffer, at DEBUG;
    the root logger, hypercorn's access log and ``sys.excepthook`` are put back
    afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    hook = sys.excepthook
    access = logging.getLogger("hypercorn.access")
    access_disabled = access.disabled
    # configure() holds these at WARNING; put back what they were
    quiet = [logging.getLogger(n) for n in logs.THIRD_PARTY_LOGGERS]
    levels = [q.level for q in quiet]
    cap = Captured()
    logs.configure("DEBUG", cap.stream)
    try:
        yield cap
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        access.disabled = access_disabled
        sys.excepthook = hook
        for q, lvl in zip(quiet, levels, strict=True):
            q.setLevel(lvl)


def hdr(token: str, request_id: str | None = None, ctype: str = CONTENT_TYPE) -> dict[str, str]:
    h = {"Authorization": f"Bearer {token}", "Content-Type": ctype}
    if request_id is not None:
        h["X-Request-Id"] = request_id
    return h


def request_lines(lines: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    return [x for x in lines if x.get("request_id") == rid]


async def test_request_id_and_session_pseudonym_on_every_line(
    settings: Settings, captured: Captured
) -> None:
    pseudonym = Pseudonymiser(settings.pseudonym_key).session(ORG, SESSION)
    async with running_service(settings) as svc:
        tok = session_token(settings, org_id=ORG, session_id=SESSION, patient_id=PATIENT)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                  headers=hdr(tok, "req-first"))
        assert r.status_code == 202 and r.headers["X-Request-Id"] == "req-first"
        r = await svc.client.post("/v1/pose/frames", content=b"XXXX",
                                  headers=hdr(tok, "req-bad.1"))
        assert r.status_code == 400 and r.headers["X-Request-Id"] == "req-bad.1"
        r = await svc.client.post(f"/v1/sessions/{SESSION}/end", headers=hdr(tok, "req-end"))
        assert r.status_code == 200
    lines = captured.lines()

    first = request_lines(lines, "req-first")
    # the session's start (logged by the supervisor inside the request) and the request
    assert [x["msg"] for x in first] == ["session started", "request"]
    assert all(x["session"] == pseudonym for x in first)
    (req,) = [x for x in first if x["msg"] == "request"]
    assert req == {**req, "level": "debug", "logger": "telemetry.http", "method": "POST",
                   "endpoint": "/v1/pose/frames", "status": 202}
    assert isinstance(req["duration_ms"], float)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", req["ts"])

    (bad,) = request_lines(lines, "req-bad.1")
    assert bad["level"] == "info" and bad["status"] == 400 and bad["code"] == "truncated"
    assert bad["client"] == "127.0.0.0"  # truncated, never the full address

    end = [x for x in request_lines(lines, "req-end") if x["msg"] == "request"]
    assert end[0]["level"] == "info" and end[0]["endpoint"] == "/v1/sessions/<session_id>/end"
    # The actor was started inside the first request; its own later lines carry its
    # session but not that request's id.
    (ended,) = [x for x in lines if x["msg"] == "session ended"]
    assert ended["session"] == pseudonym and "request_id" not in ended


async def test_no_personal_data_in_any_line(settings: Settings, captured: Captured) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings, org_id=ORG, session_id=SESSION, patient_id=PATIENT)
        await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
        await svc.client.post("/v1/pose/frames", content=batch_body(0),
                              headers=hdr(tok[:-4] + "AAAA"))
        adm = {"Authorization": f"Bearer {admin_token(settings)}"}
        r = await svc.client.get(f"/v1/admin/sessions/{SESSION}", headers=adm)
        assert r.status_code == 200
        await svc.client.post(f"/v1/sessions/{SESSION}/end", headers=hdr(tok))
        await svc.client.get(f"/v1/no-such/{SESSION}")
    text = captured.text()
    for private in (ORG, SESSION, PATIENT, tok):
        assert private not in text
    lines = captured.lines()
    admin_line = [x for x in lines if x.get("endpoint") == "/v1/admin/sessions/<session_id>"]
    assert admin_line[0]["session"].startswith("s_")
    assert {x["endpoint"] for x in lines if x["msg"] == "request"} >= {"unmatched"}


async def test_unsafe_request_ids_are_replaced(settings: Settings, captured: Captured) -> None:
    async with running_service(settings) as svc:
        seen = []
        for sent in ("has space", "x" * 65, "-leading-dash", "ok:trace-1.2_3"):
            r = await svc.client.get("/v1/healthz", headers={"X-Request-Id": sent})
            seen.append(r.headers["X-Request-Id"])
        r = await svc.client.get("/v1/healthz")
        seen.append(r.headers["X-Request-Id"])
    assert seen[3] == "ok:trace-1.2_3"
    for fresh in seen[:3] + seen[4:]:
        assert re.fullmatch(r"[0-9a-f]{16}", fresh)
    assert len(set(seen)) == 5
    logged = [x["request_id"] for x in captured.lines() if x["msg"] == "request"]
    assert logged == seen
    assert "has space" not in captured.text()


async def test_levels_follow_what_happened(
    settings: Settings, captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok, "ok"))
        await svc.client.post("/v1/pose/frames", content=batch_body(50),
                              headers=hdr(tok, "ahead"))
        await svc.client.post("/v1/pose/frames", content=batch_body(1), headers=hdr("x", "auth"))

        async def broken(*args: Any, **kw: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(svc.supervisor, "end", broken)
        r = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok, "boom"))
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        monkeypatch.undo()
    lines = captured.lines()

    def request_level(rid: str) -> str:
        (line,) = [x for x in request_lines(lines, rid) if x["msg"] == "request"]
        return line["level"]

    assert request_level("ok") == "debug"
    assert request_level("ahead") == "warning"  # 503: refused for now, retry
    assert request_level("auth") == "info"
    (auth,) = [x for x in request_lines(lines, "auth") if x["msg"] == "auth failed"]
    assert auth["level"] == "info" and auth["reason"] == "malformed_token"
    boom = request_lines(lines, "boom")
    assert request_level("boom") == "error"
    (exc,) = [x for x in boom if x["msg"] == "unhandled exception"]
    assert exc["level"] == "error" and exc["exc_type"] == "RuntimeError"
    assert exc["endpoint"] == "/v1/sessions/<session_id>/end"
    assert "sess-1" not in json.dumps(boom)  # the path is never logged, the template is
    assert all(x["session"].startswith("s_") for x in boom)


def test_third_party_libraries_stay_at_warning_at_debug(captured: Captured) -> None:
    """TELEMETRY_LOG_LEVEL=DEBUG is for our code: a library's DEBUG/INFO lines would
    print raw ids (botocore: the S3 key ``{org_id}/{session_id}.bin.gz``)."""
    key = f"{ORG}/{SESSION}.bin.gz"
    for name in logs.THIRD_PARTY_LOGGERS:
        child = logging.getLogger(f"{name}.endpoint")
        child.debug("Making request for PutObject: Key=%s", key)
        child.info("PUT /%s", key)
    logging.getLogger("telemetry.test").debug("ours")
    logging.getLogger("botocore.endpoint").warning("a warning still shows")
    assert SESSION not in captured.text()
    assert [line["msg"] for line in captured.lines()] == ["ours", "a warning still shows"]


def test_third_party_libraries_follow_a_level_above_warning(captured: Captured) -> None:
    logs.configure("ERROR", captured.stream)
    logging.getLogger("botocore.endpoint").warning("held back too")
    assert logging.getLogger("botocore").level == logging.ERROR
    assert captured.text() == ""


async def test_a_real_s3_put_at_debug_logs_no_raw_key(
    captured: Captured, s3_server: Any, s3_prefix: str
) -> None:
    """The reviewer's reproduction: a real put through botocore to moto's server."""
    from storage.s3 import S3BlobStore

    store = S3BlobStore(bucket=s3_server.bucket, prefix=s3_prefix,
                        endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    try:
        await store.put(f"{ORG}/{SESSION}.bin.gz", b"x" * 100)
    finally:
        await store.aclose()
    # werkzeug and moto are the S3 server, running in this process for the test
    ours = [line for line in captured.lines()
            if not line["logger"].startswith(("werkzeug", "moto"))]
    assert not [line for line in ours if SESSION in json.dumps(line)]


def test_filter_outside_a_request_adds_nothing() -> None:
    record = logging.makeLogRecord({"msg": "hello"})
    assert logs.RequestContextFilter().filter(record)
    assert not hasattr(record, "request_id") and not hasattr(record, "session")


def test_explicit_fields_win_and_ended_requests_tag_nothing() -> None:
    ctx = logs.begin_request("abc")
    try:
        logs.set_session("s_1")
        record = logging.makeLogRecord({"msg": "x", "session": "s_2"})
        logs.RequestContextFilter().filter(record)
        assert record.request_id == "abc" and record.session == "s_2"
    finally:
        logs.end_request()
    assert not ctx.active and logs.current_request() is None
    record = logging.makeLogRecord({"msg": "y"})
    logs.RequestContextFilter().filter(record)
    assert not hasattr(record, "request_id")


def test_safe_request_ids() -> None:
    assert logs.safe_request_id("0f8e-11:aa.b_c") == "0f8e-11:aa.b_c"
    assert logs.safe_request_id("a" * 64) == "a" * 64
    for bad in (None, "", "a" * 65, "a b", "a\nb", "ü", "-x", "a/b", "a;b"):
        assert logs.safe_request_id(bad) is None
    assert re.fullmatch(r"[0-9a-f]{16}", logs.new_request_id())


def _failing_commit() -> None:
    # What the spool's worker thread meets on a full disk: an OSError naming the file.
    raise OSError(errno.ENOSPC, "No space left on device", f"/data/spool/{ORG}/{SESSION}.log")


def _chained_failure() -> BaseException:
    """A traceback as hostile as exception text gets: ids quoted, in a key, in a
    path, in a URL, in a note, through a cause, a context and a group."""
    try:
        try:
            _failing_commit()
        except OSError as e:
            raise RuntimeError(f"commit of {ORG + '/' + SESSION!r} failed: {e}") from e
    except RuntimeError as outer:
        try:
            raise KeyError(PATIENT)
        except KeyError as ctx:
            inner = ValueError(f"GET https://s3.example/{ORG}/{SESSION}.bin.gz?p={PATIENT} "
                               "failed")
            inner.add_note(f"while storing {SESSION!r}")
            group = ExceptionGroup("Exceptions from Trio nursery", [inner, outer])
            try:
                raise group from ctx
            except ExceptionGroup as g:
                return g
    raise AssertionError("unreachable")


def test_tracebacks_keep_their_shape_and_lose_their_ids(captured: Captured) -> None:
    """The sink's half of keeping ids out of error lines: whatever an exception's
    text holds, the traceback logged keeps its chain, groups and frames, and an
    OSError's errno and strerror, but no quoted literal, key, path or URL."""
    exc = _chained_failure()
    logging.getLogger("telemetry.test").error("finalisation failed", exc_info=exc,
                                              extra={"session": "s_0123456789abcdef"})
    (line,) = captured.lines()
    text = captured.text()
    for private in (ORG, SESSION, PATIENT, "/data/spool", "s3.example"):
        assert private not in text
    assert line["exc_type"] == "ExceptionGroup" and line["session"] == "s_0123456789abcdef"
    tb = line["exc"]
    assert tb.count("Traceback (most recent call last):") == 5
    assert "The above exception was the direct cause of the following exception:" in tb
    assert "During handling of the above exception, another exception occurred:" in tb
    assert 'test_logs.py", line' in tb and ", in _failing_commit" in tb  # frames kept
    assert "OSError: [Errno 28] No space left on device" in tb
    assert ("RuntimeError: commit of <redacted> failed: [Errno 28] No space left on device: "
            "<redacted>") in tb
    assert "KeyError: <redacted>" in tb
    assert "ExceptionGroup: Exceptions from Trio nursery (2 sub-exceptions)" in tb
    assert "+---------------- 2 ----------------" in tb
    assert "| ValueError: GET <redacted> failed" in tb and "| while storing <redacted>" in tb
    assert "raise" not in tb  # no source lines


def test_uncaught_exception_is_a_json_line_without_ids(captured: Captured) -> None:
    """The fatal path: what ends the process is logged like any error, not printed
    raw by Python."""
    assert sys.excepthook is logs.log_uncaught
    try:
        _failing_commit()
    except OSError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    (line,) = captured.lines()
    assert line["level"] == "critical" and line["exc_type"] == "OSError"
    assert "[Errno 28] No space left on device" in line["exc"]
    assert ORG not in captured.text() and SESSION not in captured.text()


def test_exception_text_redacts_literals_and_paths() -> None:
    from domain.privacy import exception_text, redact

    assert redact("can't find 'sx-1' at /a/b or org/sx-1; isn't there") == \
        "can't find <redacted> at <redacted> or <redacted> isn't there"
    assert redact("x" * 600).endswith("...") and len(redact("x" * 600)) == 503
    assert exception_text(OSError(errno.EIO, "Input/output error", "/d/org/s.log",
                                  None, "/d/org/t.log")) == "[Errno 5] Input/output error"
    assert exception_text(OSError("disk full at /d/org/s.log")) == "disk full at <redacted>"

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError

    assert exception_text(Unprintable()) == "<unprintable>"


def _serve(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m telemetry.cli COMMAND`` as a process of its own, its environment
    only what a deployment would set (nothing inherited that could change the
    outcome, such as a TELEMETRY_* of the shell running the tests)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")
            and k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "telemetry.cli", command],
                          env={**base, "PYTHONPATH": str(ROOT), **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object (any other line fails the test)."""
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize(("command", "env", "named"), [
    ("serve", {"TELEMETRY_PORT": "notanumber"}, "TELEMETRY_PORT"),
    ("serve", {"TELEMETRY_LOG_LEVEL": "loud"}, "TELEMETRY_LOG_LEVEL"),
    ("serve", {"TELEMETRY_TRUSTED_PROXIES": "10.0.0.1/8"}, "TELEMETRY_TRUSTED_PROXIES"),
    ("sink", {"TELEMETRY_SINK_PORT": "-1"}, "TELEMETRY_SINK_PORT"),
    ("migrate", {"TELEMETRY_JWT_KEYS": "{"}, "TELEMETRY_JWT_KEYS"),
    # the refused URL is named in the line, its password masked
    ("serve", {"TELEMETRY_NATS_URLS": "NATS://telemetry:S9pass@nats-1:4222"},
     "TELEMETRY_NATS_URLS"),
    # files the settings name, loaded before the service opens its storage
    ("serve", {"TELEMETRY_JWT_KEYS_FILE": "/nonexistent/keys.json"}, "keys file"),
    ("serve", {"TELEMETRY_TLS_CERT": "/nonexistent/cert.pem",
               "TELEMETRY_TLS_KEY": "/nonexistent/key.pem"}, "TELEMETRY_TLS_CERT"),
    ("serve", {"TELEMETRY_JWT_PUBLIC_KEYS":
               '{"ec-1": "-----BEGIN PUBLIC KEY-----\\nnot base64\\n-----END PUBLIC KEY-----\\n"}'},
     "TELEMETRY_JWT_PUBLIC_KEYS"),
])
def test_a_bad_setting_stops_a_service_with_one_json_line(
    command: str, env: dict[str, str], named: str, tmp_path: Path
) -> None:
    done = _serve(command, {"TELEMETRY_DATA_DIR": str(tmp_path), **env}, tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = json_lines(done.stderr)
    assert line["level"] == "critical" and line["msg"] == "configuration error; not starting"
    assert line["error"].startswith(named)
    assert "S9pass" not in done.stderr


def test_a_start_up_failure_is_json_lines_only(tmp_path: Path) -> None:
    """The port is taken: the error surfaces from deep inside hypercorn's nurseries,
    and still comes out as JSON lines, the traceback a field of the last one."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve("serve", {"TELEMETRY_DATA_DIR": str(tmp_path), "TELEMETRY_SINK": "none",
                                "TELEMETRY_PORT": str(port)}, tmp_path)
    assert done.returncode != 0 and done.stdout == ""
    lines = json_lines(done.stderr)
    assert lines[-1]["level"] == "critical"
    assert "Address already in use" in lines[-1]["exc"]
