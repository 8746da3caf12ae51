"""Property-based tests of the two body decoders and of the ingest endpoints.

* ``decode_batch`` (binary pose batches): any byte string gives a
  :class:`PoseBatch` or a :class:`BatchError`, never another exception; and
  ``decode(encode(x)) == x`` (and ``encode(decode(b)) == b``) for valid batches.
* ``decode_media_batch`` (JSON media batches): any JSON value, any byte string and
  any near-valid batch give a :class:`MediaBatch` or a :class:`MediaBatchError`.
* Over real HTTP: any body to ``/v1/pose/frames`` and ``/v1/media/events`` (and any
  Authorization header) gets a 2xx or a 4xx. The one 5xx allowed is the documented
  back-pressure answer, 503 with ``Retry-After`` and a retry code (a structurally
  valid batch far ahead of the session's sequence window is told to come back
  later); a 500 -- an unhandled exception -- always fails the test.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from domain.media_batch import (
    EVENT_TYPES,
    SPECS,
    MediaBatch,
    MediaBatchError,
    decode_media_batch,
)
from domain.pose_batch import (
    CONTENT_TYPE,
    HEADER,
    LANDMARKS,
    MAGIC,
    BatchError,
    PoseBatch,
    decode_batch,
    encode_batch,
)
from telemetry.auth import mint_session_token
from telemetry.config import Settings
from tests.support.payloads import batch_body
from tests.support.service import running_service

MAX_FRAMES = 120
RETRY_CODES = {"sequence_ahead_of_window", "mailbox_full", "spool_full", "shutting_down"}

# -- the binary pose batch -------------------------------------------------------------


def decodes_or_refuses(data: bytes) -> PoseBatch | None:
    try:
        batch = decode_batch(data, max_frames=MAX_FRAMES)
    except BatchError as exc:
        assert exc.code and str(exc)
        return None
    assert isinstance(batch, PoseBatch)
    return batch


@given(st.binary(max_size=4096))
@example(b"")
@example(MAGIC)
@example(batch_body(0)[:-1])
def test_any_bytes_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


@st.composite
def plausible_headers(draw: st.DrawFn) -> bytes:
    """A header that passes the magic check, with every other field free, plus a tail
    of random length: reaches the deeper checks far more often than random bytes."""
    n = draw(st.integers(0, 0xFFFF))
    header = HEADER.pack(MAGIC, draw(st.integers(0, 255)), draw(st.integers(0, 255)),
                         draw(st.sampled_from([LANDMARKS, 0, 255])),
                         draw(st.sampled_from([4, 0, 255])), draw(st.integers(0, 2**32 - 1)),
                         n, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)),
                         draw(st.sampled_from([0, 0, 1])))
    tail = draw(st.binary(max_size=2 * 532 + 3))
    return header + tail


@given(plausible_headers())
def test_plausible_headers_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 20 * 532 + 19),
                                              st.integers(0, 255)), max_size=8))
def test_mutated_valid_batches_decode_or_refuse(n_extra: int,
                                               flips: list[tuple[int, int]]) -> None:
    data = bytearray(batch_body(0, n=1 + n_extra * 5))
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    decodes_or_refuses(bytes(data))


@st.composite
def valid_batches(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 12))
    t = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n, unique=True))
    coords = draw(hnp.arrays(np.float32, (n, LANDMARKS, 3),
                             elements=st.floats(-1e4, 1e4, width=32)))
    vis = draw(hnp.arrays(np.float32, (n, LANDMARKS, 1), elements=st.floats(0, 1, width=32)))
    frames = np.concatenate([coords, vis], axis=2)
    no_pose = draw(hnp.arrays(np.bool_, (n,)))
    frames[no_pose] = np.nan
    sized = draw(st.booleans())
    return {
        "seq": draw(st.integers(0, 2**32 - 1)),
        "t_ms": np.array(sorted(t), dtype=np.uint32),
        "frames": frames,
        "space": draw(st.sampled_from(["image", "world"])),
        "image_width": draw(st.integers(1, 0xFFFF)) if sized else 0,
        "image_height": draw(st.integers(1, 0xFFFF)) if sized else 0,
    }


@given(valid_batches())
def test_decode_encode_round_trip(x: dict[str, Any]) -> None:
    data = encode_batch(x["seq"], x["t_ms"], x["frames"], space=x["space"],
                        image_width=x["image_width"], image_height=x["image_height"])
    b = decode_batch(data, max_frames=MAX_FRAMES)
    assert (b.seq, b.space, b.image_width, b.image_height) == (
        x["seq"], x["space"], x["image_width"], x["image_height"])
    assert b.t_ms.dtype == np.uint32 and np.array_equal(b.t_ms, x["t_ms"])
    assert b.frames.dtype == np.float32
    assert np.array_equal(b.frames, x["frames"], equal_nan=True)
    again = encode_batch(b.seq, b.t_ms, b.frames, space=b.space, image_width=b.image_width,
                         image_height=b.image_height)
    assert again == data


# -- the JSON media batch ---------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=5),
    max_leaves=25,
)
FIELD_NAMES = sorted({k for spec in SPECS.values() for k in spec} | {"id", "type", "t_ms"})


@st.composite
def near_valid_media(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed envelopes whose events have real types and real field names with
    arbitrary values: every field validator sees hostile input."""
    events = []
    for i in range(draw(st.integers(0, 6))):
        ev: dict[str, Any] = {"id": f"e{i}", "type": draw(st.sampled_from(EVENT_TYPES)),
                              "t_ms": draw(st.integers(0, 10_000) | json_scalars)}
        for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=4)):
            ev[name] = draw(json_scalars | st.sampled_from([0, 1, 50, 2.5, "wifi", "720p"]))
        events.append(ev)
    doc: dict[str, Any] = {"media_id": draw(st.sampled_from(["m-1", "", "x" * 200, 7])),
                           "view_id": "v-1", "events": events}
    if draw(st.booleans()):
        doc["media_duration_s"] = draw(json_scalars | st.floats(0.1, 100))
    return doc


def media_decodes_or_refuses(body: bytes) -> MediaBatch | None:
    try:
        batch = decode_media_batch(body, max_events=500, max_bytes=256 * 1024)
    except MediaBatchError as exc:
        assert exc.code and str(exc)
        return None
    assert isinstance(batch, MediaBatch)
    return batch


@given(json_values)
@example({"media_id": "m", "view_id": "v", "media_duration_s": 10**400,
          "events": [{"id": "e", "type": "play", "t_ms": 1, "position_seconds": 0}]})
@example({"media_id": "m", "view_id": "v",
          "events": [{"id": "e", "type": "play", "t_ms": 1, "position_seconds": 10**400}]})
def test_any_json_value_decodes_or_refuses(value: Any) -> None:
    media_decodes_or_refuses(json.dumps(value).encode())


@given(st.binary(max_size=2048))
@example(b"[" * 100_000)
@example(b'{"media_id": 1' + b"0" * 5000 + b"}")
def test_any_bytes_media_decode_or_refuse(data: bytes) -> None:
    media_decodes_or_refuses(data)


@given(near_valid_media())
def test_near_valid_media_decodes_or_refuses(doc: dict[str, Any]) -> None:
    media_decodes_or_refuses(json.dumps(doc).encode())


# -- over HTTP ----------------------------------------------------------------------------


@dataclasses.dataclass
class ThreadService:
    url: str
    settings: Settings
    # No keep-alive: a fresh connection per request. A refusal sent before the body
    # is read can race with the client reusing the connection (a keep-alive matter,
    # reported separately), which is not what these properties are about.
    client: httpx.Client


@pytest.fixture(scope="module")
def http_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadService]:
    """The real service in its own thread (its own Trio run), so the hypothesis tests
    can be plain synchronous tests making real HTTP calls to it."""
    s = dataclasses.replace(
        Settings(), host="127.0.0.1", port=0, data_dir=Path(tmp_path_factory.mktemp("fuzz")),
        pseudonym_key=b"k" * 32, sink="none", idle_timeout_s=30.0, gap_timeout_s=2.0,
        shutdown_deadline_s=10.0)
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        async with running_service(s) as svc:
            box["url"] = svc.url
            box["token"] = trio.lowlevel.current_trio_token()
            box["stop"] = stop = trio.Event()
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="fuzz-service")
    thread.start()
    assert ready.wait(60), "service did not start"
    if "error" in box:
        raise box["error"]
    try:
        with httpx.Client(base_url=box["url"], timeout=20,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            yield ThreadService(box["url"], s, client)
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join(60)
        assert not thread.is_alive()
        if "error" in box:
            raise box["error"]


def assert_not_a_crash(r: httpx.Response) -> None:
    assert r.status_code < 500 or (
        r.status_code == 503 and "Retry-After" in r.headers
        and r.json()["error"]["code"] in RETRY_CODES
    ), f"{r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        assert r.json()["error"]["code"]  # every refusal is the JSON error shape


HTTP_SETTINGS = settings(max_examples=60, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow])


def post(svc: ThreadService, path: str, body: bytes, ctype: str, token: str) -> httpx.Response:
    return svc.client.post(path, content=body, headers={"Content-Type": ctype,
                                                        "Authorization": f"Bearer {token}"})


def fresh_token(svc: ThreadService) -> str:
    return mint_session_token(svc.settings, org_id="org-fuzz", session_id=uuid.uuid4().hex)


@HTTP_SETTINGS
@given(body=st.binary(max_size=3000) | plausible_headers()
       | st.builds(lambda s: batch_body(s % 4), st.integers(0, 1000)))
def test_http_pose_any_body(http_service: ThreadService, body: bytes) -> None:
    r = post(http_service, "/v1/pose/frames", body, CONTENT_TYPE, fresh_token(http_service))
    assert_not_a_crash(r)


@HTTP_SETTINGS
@given(body=st.builds(lambda v: json.dumps(v).encode(), json_values | near_valid_media())
       | st.binary(max_size=2000))
@example(body=json.dumps({"media_id": "m", "view_id": "v", "events": [
    {"id": "e", "type": "play", "t_ms": 1, "position_seconds": 10**400}]}).encode())
def test_http_media_any_body(http_service: ThreadService, body: bytes) -> None:
    r = post(http_service, "/v1/media/events", body, "application/json",
             fresh_token(http_service))
    assert_not_a_crash(r)


@HTTP_SETTINGS
@given(authorization=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                             max_size=300).map(str.strip),
       ctype=st.sampled_from([CONTENT_TYPE, "application/json", "text/plain", "", "a/b; x=\""]))
def test_http_any_authorization_and_content_type(
    http_service: ThreadService, authorization: str, ctype: str
) -> None:
    for path in ("/v1/pose/frames", "/v1/media/events", "/v1/sessions/s-1/end",
                 "/v1/admin/sessions"):
        method = "GET" if path.startswith("/v1/admin") else "POST"
        headers = {"Content-Type": ctype}
        if authorization:
            headers["Authorization"] = authorization
        r = http_service.client.request(method, path, content=batch_body(0), headers=headers)
        assert_not_a_crash(r)
        assert r.status_code in (401, 403), r.text
