"""The running service against ``docs/openapi.yaml``: every answer must be one the spec allows.

An equivalent of a schemathesis run, driven by Hypothesis from the spec itself:

* requests for every operation are generated from the spec's schemas -- path and
  query parameters, ``X-Request-Id`` headers and JSON bodies from their JSON Schemas
  (valid, near-valid and garbage), binary pose bodies as valid batches
  (:func:`domain.pose_batch.encode_batch`), mutated batches and random bytes -- with
  every kind of credential: valid, missing, garbage, expired, without consent, of the
  other kind;
* they go over real HTTP to :func:`tests.service.running_service`;
* each answer is checked against the operation's declared responses: the status is
  declared, the content type is declared, the JSON body validates against the
  declared schema (``jsonschema``, draft 2020-12, as OpenAPI 3.1 says), the declared
  headers are there (``X-Request-Id`` on every answer, ``Retry-After`` on 429/503).

A 5xx fails the test, except a declared 503 that the generated traffic legitimately
causes (``sequence_ahead_of_window``: a batch far ahead of its session's window;
``mailbox_full``: back-pressure) -- anything storage- or shutdown-related would be a
fault here. The Hypothesis engine runs in a worker thread and the service on the
test's Trio loop, so the test is an ordinary pytest-trio test.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import trio
import yaml
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_spec

from actors.supervisor import Supervisor
from domain.pose_batch import CONTENT_TYPE, encode_batch
from domain.privacy import Pseudonymiser
from storage.blobs import FilesystemBlobStore
from storage.bus import InProcessBus
from telemetry.app import AppState, create_app
from telemetry.auth import TokenVerifier, mint_service_token, mint_session_token
from telemetry.config import Settings
from telemetry.lean import ROUTES as LEAN_ROUTES
from telemetry.wiring import actor_limits
from tests.support.payloads import pose_frames
from tests.support.service import running_service

SPEC_PATH = Path(__file__).parents[2] / "docs" / "openapi.yaml"
# 503 answers the generated traffic may legitimately cause; any other 5xx is a fault.
EXPECTED_503 = {"sequence_ahead_of_window", "mailbox_full"}
ORGS = ("org-a", "org-b")
SESSIONS = tuple(f"s-{i}" for i in range(6))
# About 15 s on an idle machine (request generation is a third of it).
FUZZ_EXAMPLES = 500
# How often an operation is picked, relative to the others (the ingest bodies have the
# most to explore).
WEIGHTS = {"POST /v1/pose/frames": 4, "POST /v1/media/events": 4,
           "POST /v1/sessions/{session_id}/end": 2}


def load_spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def resolve(node: Any, spec: dict[str, Any]) -> Any:
    """``node`` with every local ``$ref`` replaced by its target (the spec has no
    recursive schemas), so JSON Schema validation and generation need no resolver."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolve(target, spec)
        return {k: resolve(v, spec) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, spec) for v in node]
    return node


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    template: str  # the spec's path, e.g. /v1/sessions/{session_id}/end
    spec: dict[str, Any]  # resolved operation object

    @property
    def key(self) -> str:
        return f"{self.method} {self.template}"

    def __repr__(self) -> str:
        return self.key

    def parameters(self, where: str) -> list[dict[str, Any]]:
        return [p for p in self.spec.get("parameters", []) if p["in"] == where]


def operations(spec: dict[str, Any]) -> dict[str, Operation]:
    resolved = resolve(spec["paths"], spec)
    ops = {}
    for template, item in resolved.items():
        for method, op in item.items():
            o = Operation(method.upper(), template, op)
            ops[o.key] = o
    return ops


# -- request generation from JSON Schema --------------------------------------------------


def from_schema(s: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for the JSON Schema subset the spec's request schemas use (built
    once per distinct schema: strategies are drawn from hundreds of times)."""
    return _from_schema_json(json.dumps(s, sort_keys=True))


@functools.cache
def _from_schema_json(text: str) -> st.SearchStrategy[Any]:
    return _build(json.loads(text))


def _build(s: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "const" in s:
        return st.just(s["const"])
    if "enum" in s:
        return st.sampled_from(s["enum"])
    for key in ("oneOf", "anyOf"):
        if key in s:
            return st.one_of([from_schema(sub) for sub in s[key]])
    t = s.get("type")
    if isinstance(t, list):
        return st.one_of([from_schema({**s, "type": one}) for one in t])
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        return st.integers(s.get("minimum"), s.get("maximum"))
    if t == "number":
        lo, hi = s.get("minimum", s.get("exclusiveMinimum")), s.get("maximum")
        floats = st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                           exclude_min="exclusiveMinimum" in s)
        return st.one_of(floats, st.integers(int(lo or 0) + ("exclusiveMinimum" in s),
                                             int(hi) if hi is not None else None))
    if t == "string":
        if "pattern" in s:
            strategy = st.from_regex(s["pattern"], fullmatch=True)
        else:
            strategy = st.text(min_size=s.get("minLength", 0), max_size=s.get("maxLength", 40))
        if "not" in s and "pattern" in s["not"]:
            strategy = strategy.filter(lambda v: not re.search(s["not"]["pattern"], v))
        return strategy
    if t == "array":
        return st.lists(from_schema(s["items"]), min_size=s.get("minItems", 0),
                        max_size=min(s.get("maxItems", 8), 8))
    if t == "object":
        props = s.get("properties", {})
        required = set(s.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required})
    raise AssertionError(f"schema outside the generator's subset: {s}")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=10)


@st.composite
def near_valid(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid document with one thing wrong: a key dropped, a value of the wrong
    type, an unknown key -- at the top or in a nested object."""
    doc = copy.deepcopy(draw(valid))
    objects = [doc] + [e for e in doc.get("events", []) if isinstance(e, dict)] \
        if isinstance(doc, dict) else []
    if not objects:
        return doc
    target = draw(st.sampled_from(objects))
    how = draw(st.sampled_from(["drop", "retype", "extra"]))
    if how == "drop" and target:
        del target[draw(st.sampled_from(sorted(target)))]
    elif how == "retype" and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(JSON_VALUES)
    else:
        target[draw(st.text(min_size=1, max_size=10))] = draw(JSON_VALUES)
    return doc


def plausible_media(doc: dict[str, Any]) -> dict[str, Any]:
    """Make a schema-valid batch pass the rules the schema can't say: unique event ids,
    non-decreasing ``t_ms``, positions within the media duration."""
    doc = copy.deepcopy(doc)
    doc["media_duration_s"] = None
    ts = sorted(e["t_ms"] for e in doc["events"])
    for i, (event, t) in enumerate(zip(doc["events"], ts, strict=True)):
        event["id"], event["t_ms"] = f"e-{i}", t
    return doc


# Any text that is still one path segment of the same route: not empty, no "/", not a
# dot segment (those address another URL, not this operation with a bad parameter).
ANY_SEGMENT = st.text(min_size=1, max_size=12).filter(
    lambda v: "/" not in v and v not in (".", ".."))


@dataclasses.dataclass
class Request:
    op: Operation
    path: str
    headers: dict[str, str]
    body: bytes | None = None
    request_id: str | None = None  # what the client sent as X-Request-Id

    def __repr__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        shown = {k: (v[:40] + "...") if k == "Authorization" else v
                 for k, v in self.headers.items()}
        return (f"{self.op.method} {self.path} headers={shown} "
                f"body={(self.body or b'')[:120]!r}")


class Tokens:
    """Credentials, minted once per (kind, org, session)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self._cache: dict[tuple[Any, ...], str] = {}

    def session(self, org: str, sid: str, **kw: Any) -> str:
        key = ("session", org, sid, tuple(sorted(kw.items())))
        if key not in self._cache:
            self._cache[key] = mint_session_token(self.s, org_id=org, session_id=sid, **kw)
        return self._cache[key]

    def admin(self, **kw: Any) -> str:
        key = ("admin", tuple(sorted(kw.items())))
        if key not in self._cache:
            self._cache[key] = mint_service_token(self.s, **kw)
        return self._cache[key]


@st.composite
def authorization(draw: st.DrawFn, tokens: Tokens, kind: str, org: str, sid: str) -> str | None:
    """An Authorization header: mostly the right credential, else every wrong one."""
    right = (tokens.session(org, sid) if kind == "session" else tokens.admin())
    other = (tokens.admin() if kind == "session" else tokens.session(org, sid))
    choice = draw(st.sampled_from(
        ["right"] * 6 + ["missing", "garbage", "basic", "expired", "other_kind", "oversized",
                         "no_consent", "no_scope", "tampered"]))
    bearer = {
        "right": right,
        "garbage": draw(st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                min_size=1, max_size=60)),
        "expired": (tokens.session(org, sid, ttl_s=-600) if kind == "session"
                    else tokens.admin(ttl_s=-600)),
        "other_kind": other,
        "oversized": "a" * 5000,
        "no_consent": tokens.session(org, sid, biometric=False, analytics=False),
        "no_scope": tokens.admin(scope="telemetry:sink"),
        "tampered": right[:-6] + "AAAAAA",
    }
    if choice == "missing":
        return None
    if choice == "basic":
        return "Basic dXNlcjpwYXNz"
    return f"Bearer {bearer[choice]}"


@st.composite
def pose_body(draw: st.DrawFn) -> bytes:
    """A valid batch (sequence numbers around a session's window), a mutated one, or
    random bytes."""
    kind = draw(st.sampled_from(["valid"] * 4 + ["flipped", "truncated", "extended", "random",
                                                 "long"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    seq = draw(st.integers(0, 14))
    # "long": over the test's body cap (or over the frame cap of 120)
    n = draw(st.integers(60, 130) if kind == "long" else st.integers(1, 30))
    t, frames = pose_frames(n, t0=seq * 1000, seed=seq)
    space = draw(st.sampled_from(["image"] * 5 + ["world"]))
    body = encode_batch(seq, t, frames, space=space, image_width=640, image_height=480)
    if kind == "flipped":
        raw = bytearray(body)
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "truncated":
        return body[: draw(st.integers(0, len(body) - 1))]
    if kind == "extended":
        return body + draw(st.binary(min_size=1, max_size=600))
    return body


# The request ids the service echoes; it replaces any other (the spec's parameter
# takes any string, and its description says which are echoed).
SAFE_REQUEST_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"


@st.composite
def request_id_header(draw: st.DrawFn) -> str | None:
    # Unsafe ones too: long, or with characters outside the token charset (printable,
    # as HTTP allows in a header value).
    return draw(st.one_of(
        st.none(), st.from_regex(SAFE_REQUEST_ID, fullmatch=True),
        st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=90)))


@st.composite
def requests(draw: st.DrawFn, ops: dict[str, Operation], tokens: Tokens) -> Request:
    """One request for a spec operation, every part drawn from the spec."""
    op = ops[draw(st.sampled_from([k for k in sorted(ops) for _ in range(WEIGHTS.get(k, 1))]))]
    org, sid = draw(st.sampled_from(ORGS)), draw(st.sampled_from(SESSIONS))
    headers: dict[str, str] = {}

    path = op.template
    for p in op.parameters("path"):
        value = draw(st.one_of(st.just(sid), from_schema(p["schema"]), ANY_SEGMENT))
        path = path.replace("{" + p["name"] + "}", quote(value, safe=""))
    query = []
    for p in op.parameters("query"):
        value = draw(st.one_of(st.none(), st.just(org), from_schema(p["schema"])))
        if value is not None:
            query.append(f"{p['name']}={quote(value, safe='')}")
    if query:
        path += "?" + "&".join(query)
    rid = None
    for p in op.parameters("header"):
        value = draw(request_id_header())
        if value is not None:
            headers[p["name"]] = rid = value

    security = op.spec.get("security", [])
    if security:
        kind = "session" if "sessionToken" in security[0] else "service"
        auth = draw(authorization(tokens, kind, org, sid))
        if auth is not None:
            headers["Authorization"] = auth

    body = None
    content = op.spec.get("requestBody", {}).get("content", {})
    if CONTENT_TYPE in content:
        body = draw(pose_body())
        headers["Content-Type"] = draw(st.sampled_from(
            [CONTENT_TYPE] * 8 + ["application/json", "application/octet-stream"]))
    elif "application/json" in content:
        schema = content["application/json"]["schema"]
        valid = from_schema(schema)
        doc_kind = draw(st.sampled_from(["plausible"] * 4 + ["valid", "near", "json"]))
        if doc_kind == "plausible":
            body = json.dumps(plausible_media(draw(valid))).encode()
        elif doc_kind == "valid":
            body = json.dumps(draw(valid)).encode()
        elif doc_kind == "near":
            body = json.dumps(draw(near_valid(valid))).encode()
        else:
            body = draw(st.one_of(st.binary(max_size=200),
                                  JSON_VALUES.map(lambda v: json.dumps(v).encode())))
        headers["Content-Type"] = draw(st.sampled_from(
            ["application/json"] * 8 + ["text/plain", CONTENT_TYPE]))
    if body is not None and draw(st.integers(0, 19)) == 0:
        headers["Content-Encoding"] = "gzip"
    return Request(op, path, headers, body, rid)


# -- response checks ---------------------------------------------------------------------


def error_code(r: httpx.Response) -> str | None:
    """The ``error.code`` of an answer, if it has the error shape."""
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def schema_errors(schema: dict[str, Any], value: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(value))


def check(req: Request, r: httpx.Response) -> None:
    """Fail unless the spec allows ``r`` as the answer to ``req``."""
    where = f"\n  request: {req.describe()}\n  answer: {r.status_code} {r.text[:400]}"
    if r.status_code >= 500:
        assert r.status_code == 503 and error_code(r) in EXPECTED_503, f"server error{where}"
    responses = req.op.spec["responses"]
    assert str(r.status_code) in responses, f"undeclared status{where}"
    declared = responses[str(r.status_code)]
    ctype = r.headers.get("Content-Type", "").split(";")[0].strip()
    content = declared.get("content", {})
    assert ctype in content, f"content type {ctype!r} not declared{where}"
    if ctype == "application/json":
        errors = schema_errors(content[ctype]["schema"], r.json())
        assert not errors, f"body does not match the schema: {errors[0]}{where}"
    for name, header in declared.get("headers", {}).items():
        value = r.headers.get(name)
        if header.get("required"):
            assert value is not None, f"header {name} missing{where}"
        if value is not None:
            schema = header["schema"]
            typed: Any = value
            if schema.get("type") == "integer":
                assert value.isdigit(), f"header {name} is not an integer{where}"
                typed = int(value)
            errors = schema_errors(schema, typed)
            assert not errors, f"header {name}: {errors[0]}{where}"
    got = r.headers.get("X-Request-Id")
    if req.request_id is not None and re.fullmatch(SAFE_REQUEST_ID, req.request_id):
        assert got == req.request_id, f"safe request id not echoed{where}"
    else:
        assert got != req.request_id and re.fullmatch(r"[0-9a-f]{16}", got or ""), \
            f"unsafe or missing request id not replaced by a fresh one{where}"


class Driver:
    """Sends requests from the Hypothesis thread and records what was seen."""

    def __init__(self, url: str) -> None:
        # No connection reuse: a refusal sent before the body was read may close the
        # connection under the client, which is a keep-alive matter, not the spec's.
        self.client = httpx.Client(base_url=url, timeout=20,
                                   limits=httpx.Limits(max_keepalive_connections=0))
        self.seen: dict[str, set[int]] = {}

    def send(self, req: Request) -> httpx.Response:
        r = self.client.request(req.op.method, req.path, headers=req.headers, content=req.body)
        check(req, r)
        self.seen.setdefault(req.op.key, set()).add(r.status_code)
        return r


# -- the tests ---------------------------------------------------------------------------


def test_spec_is_valid_openapi() -> None:
    validate_spec(load_spec())


def test_spec_covers_every_route(settings: Settings) -> None:
    """Every route the app serves is in the spec, and nothing else is."""
    pseudonyms = Pseudonymiser(settings.pseudonym_key)
    supervisor = Supervisor(actor_limits(settings),
                            store=FilesystemBlobStore(settings.data_dir / "blobs"),
                            bus=InProcessBus(), pseudonyms=pseudonyms)
    app = create_app(AppState(settings, supervisor, TokenVerifier(settings), pseudonyms))
    served = set(LEAN_ROUTES)
    for rule in app.quart.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<([a-z_]+)>", r"{\1}", rule.rule)
        served |= {f"{method} {path}" for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == set(operations(load_spec()))


async def test_service_answers_only_what_the_spec_allows(settings: Settings) -> None:
    # A body cap that long batches exceed, so 413 is reached too (30 frames: 15,980 bytes).
    settings = dataclasses.replace(settings, max_body_bytes=20_000)
    spec = load_spec()
    ops = operations(spec)
    tokens = Tokens(settings)

    def happy_path(driver: Driver) -> None:
        """Every operation's success answer at least once (the fuzz below may not
        reach them all), checked like any other answer."""
        def req(key: str, path: str, headers: dict[str, str],
                body: bytes | None = None) -> httpx.Response:
            return driver.send(Request(ops[key], path, headers, body))

        tok = tokens.session("org-a", "happy")
        t, f = pose_frames(30)
        pose = {"Authorization": f"Bearer {tok}", "Content-Type": CONTENT_TYPE}
        assert req("POST /v1/pose/frames", "/v1/pose/frames", pose,
                   encode_batch(0, t, f)).status_code == 202
        media = plausible_media({"media_id": "m-1", "view_id": "v-1", "events": [
            {"id": "x", "type": "session_start", "t_ms": 0, "connection_type": "wifi"},
            {"id": "y", "type": "play", "t_ms": 10, "position_seconds": 0}]})
        assert req("POST /v1/media/events", "/v1/media/events",
                   {**pose, "Content-Type": "application/json"},
                   json.dumps(media).encode()).status_code == 202
        adm = {"Authorization": f"Bearer {tokens.admin()}"}
        assert req("GET /v1/admin/sessions", "/v1/admin/sessions", adm).status_code == 200
        assert req("GET /v1/admin/sessions/{session_id}", "/v1/admin/sessions/happy",
                   adm).status_code == 200
        assert req("POST /v1/admin/sessions/{session_id}/end",
                   "/v1/admin/sessions/happy/end", adm).status_code == 200
        for path in ("/v1/healthz", "/v1/readyz", "/metrics"):
            assert req(f"GET {path}", path, {}).status_code == 200
        tok2 = tokens.session("org-b", "happy-2")
        assert req("POST /v1/pose/frames", "/v1/pose/frames",
                   {**pose, "Authorization": f"Bearer {tok2}"},
                   encode_batch(0, t, f)).status_code == 202
        assert req("POST /v1/sessions/{session_id}/end", "/v1/sessions/happy-2/end",
                   {"Authorization": f"Bearer {tok2}"}).status_code == 200

    def fuzz(driver: Driver) -> None:
        @hypothesis_settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
            phases=[Phase.explicit, Phase.generate],  # the service is stateful: no shrinking
            suppress_health_check=list(HealthCheck))
        @given(requests(ops, tokens))
        def one(req: Request) -> None:
            driver.send(req)

        one()

    async with running_service(settings) as svc:
        driver = Driver(svc.url)
        try:
            await trio.to_thread.run_sync(happy_path, driver)
            await trio.to_thread.run_sync(fuzz, driver)
        finally:
            driver.client.close()

    assert set(driver.seen) == set(ops), "some operations were never exercised"
    for key in ("POST /v1/pose/frames", "POST /v1/media/events",
                "POST /v1/sessions/{session_id}/end", "GET /v1/admin/sessions/{session_id}"):
        assert any(400 <= s < 500 for s in driver.seen[key]), (key, driver.seen[key])



def test_every_operation_declares_405_and_a_default_error() -> None:
    """OpenAPI has no path-level responses: each operation carries its path's 405
    (with ``Allow``) and a ``default`` error answer with the error body."""
    spec = load_spec()
    for key, op in operations(spec).items():
        responses = op.spec["responses"]
        assert "Allow" in responses.get("405", {}).get("headers", {}), key
        default = responses.get("default", {}).get("content", {}).get("application/json")
        assert default is not None, key
        assert schema_errors(default["schema"], {"error": {"code": "internal_error",
                                                           "message": "x"}}) == [], key


# Methods an undeclared-method request may use: each path defines one or two of them.
PROBE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


async def test_undeclared_methods_get_405_with_allow(settings: Settings) -> None:
    """Every path answers a method it does not define with the declared 405: the
    error body, and ``Allow`` naming the methods the spec declares for it."""
    spec = load_spec()
    by_path: dict[str, dict[str, Operation]] = {}
    for op in operations(spec).values():
        by_path.setdefault(op.template, {})[op.method] = op
    assert by_path, "no paths"
    tried = 0
    async with running_service(settings) as svc:
        for template, ops in sorted(by_path.items()):
            path = template.replace("{session_id}", "s-1")
            declared = next(iter(ops.values())).spec["responses"]["405"]
            for method in sorted(set(PROBE_METHODS) - set(ops)):
                r = await svc.client.request(method, path, content=b"")
                where = f"{method} {path}: {r.status_code} {r.text[:200]}"
                assert r.status_code == 405, where
                assert error_code(r) == "method_not_allowed", where
                errors = schema_errors(declared["content"]["application/json"]["schema"],
                                       r.json())
                assert not errors, (where, errors)
                allow = r.headers.get("Allow")
                assert allow is not None and re.fullmatch(
                    declared["headers"]["Allow"]["schema"]["pattern"], allow), where
                # What the spec declares, plus what HTTP implies (HEAD with GET, OPTIONS).
                assert set(ops) <= set(allow.split(", ")) <= set(ops) | {"HEAD", "OPTIONS"}, \
                    where
                assert method not in allow.split(", "), where
                assert re.fullmatch(r"[0-9a-f]{16}", r.headers.get("X-Request-Id", "")), where
                tried += 1
    assert tried >= 3 * len(by_path)
