"""schemathesis against the running service: a second, independent reading of
``docs/openapi.yaml``, beside the spec-driven test in ``test_openapi.py``.

schemathesis's own engine (the one its CLI runs) generates the requests from the
spec -- its examples, coverage and fuzzing phases, the coverage phase including
methods the spec does not declare for a path -- sends them over real HTTP to
:func:`tests.service.running_service` with a session and a service-account token
for the two security schemes, and applies all its checks to every answer (status,
content type, headers and body against the declared response; 5xx; undeclared
methods answered 405 with ``Allow``; bad input refused, valid input accepted;
credentials actually checked).

Bounded and reproducible: a fixed seed and ``deterministic`` generation (Hypothesis's
``derandomize``), a fixed number of examples per operation, no example database or
cache on disk. The engine is synchronous (requests), so it runs in a worker thread
while the service runs on the test's Trio loop.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import schemathesis
import trio
import yaml
from schemathesis import GenerationMode
from schemathesis.engine import Status, events

from domain.pose_batch import CONTENT_TYPE, encode_batch
from telemetry.config import Settings
from tests.support.payloads import admin_token, pose_frames, session_token
from tests.support.service import running_service

SPEC_PATH = Path(__file__).parents[2] / "docs" / "openapi.yaml"
# Generated examples per operation and phase.
MAX_EXAMPLES = 25
SEED = 16
# The run's bound, seconds (it takes about 25 s on an idle machine): past it the run
# is stopped and the test fails.
MAX_TIME_S = 600  # only to catch a hang: ~25 s idle, several times that on a loaded CI
# The body cap, as the spec's maxLength of the pose body states it.
MAX_BODY_BYTES = Settings().max_body_bytes
# Sequence numbers the pose batches use: within the reorder window of a new session.
POSE_SEQS = 8
# The 400s a schema-valid media batch may get: rules JSON Schema cannot say (unique
# event ids, non-decreasing t_ms, positions within the batch's media duration) and
# the session's state (a view id reused for another media, too many views).
MEDIA_CROSS_FIELD = frozenset({"duplicate_event_id", "non_monotonic_time",
                               "beyond_media_duration", "view_media_mismatch",
                               "too_many_views"})


@schemathesis.check
def media_refusals_are_cross_field(ctx: schemathesis.CheckContext,
                                   response: schemathesis.Response,
                                   case: schemathesis.Case) -> bool | None:
    """A schema-valid media batch refused 400 is refused for a rule the schema cannot
    say -- never for its types or ranges (which the spec does say)."""
    if (case.operation.label != "POST /v1/media/events" or response.status_code != 400
            or case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE):
        return None
    code = response.json()["error"]["code"]
    if code not in MEDIA_CROSS_FIELD:
        raise AssertionError(f"schema-valid media batch refused with {code!r}: "
                             f"{response.json()['error']['message']}")
    return True


@schemathesis.serializer(CONTENT_TYPE)
def pose_batch(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """The pose body's wire format, which JSON Schema cannot describe (the spec says
    ``format: binary``): a schema-valid value (a string) becomes a valid batch, picked
    by its bytes among the first sequence numbers of the session (so positive requests
    are accepted, or refused for the session's state, never for their format); any
    other value (a negative case) goes as its JSON text, which is no batch."""
    if isinstance(value, str | bytes):
        raw = value.encode() if isinstance(value, str) else value
        if len(raw) > MAX_BODY_BYTES:  # a negative case: longer than the spec's cap
            return raw
        seq = sum(raw) % POSE_SEQS
        t, frames = pose_frames(30, t0=seq * 1000, seed=seq)
        return encode_batch(seq, t, frames)
    return json.dumps(value, default=str).encode()


def engine_config(base_url: str, session: str, admin: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "cache": {"enabled": False},
        "base-url": base_url,
        "request-timeout": 20,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        # The spec declares no links between operations: nothing for a stateful run.
        "phases": {"stateful": {"enabled": False}},
        # What an invalid request may be answered besides schemathesis's defaults: 413
        # for a body over the cap (the spec's maxLength).
        "checks": {"negative_data_rejection": {"expected-statuses": [
            400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]}},
        "auth": {"openapi": {"sessionToken": {"bearer": session},
                             "serviceToken": {"bearer": admin}}},
        "operations": [
            # Schema-valid batches may still break a cross-field rule (400, checked by
            # media_refusals_are_cross_field) or meet a view ended earlier (409).
            {"include-operation-id": "postMediaEvents",
             "checks": {"positive_data_acceptance": {
                 "expected-statuses": ["2xx", 400, 401, 403, 404, 409, 429, "5xx"]}}},
            # An HTTP client cannot open a WebSocket: a plain GET is answered 426.
            {"include-operation-id": "streamPoseFrames",
             "checks": {"positive_data_acceptance": {"expected-statuses": [426]},
                        "negative_data_rejection": {"expected-statuses": [426]},
                        # (it expects 401 for a missing token: the handshake, which a
                        # plain request never reaches; test_stream.py covers it)
                        "missing_required_header": {"enabled": False}}},
        ],
    })


@dataclasses.dataclass
class Outcome:
    requests: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    # Operations with a passing scenario, and the methods answered 405 per operation
    # (the undeclared methods the coverage phase tried on its path).
    passed: set[str] = dataclasses.field(default_factory=set)
    refused_methods: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None


def run_engine(config: schemathesis.Config) -> Outcome:
    """One schemathesis run (blocking): what it sent, and every failure it found."""
    schema = schemathesis.openapi.from_path(SPEC_PATH, config=config)
    out = Outcome()
    stream = schemathesis.engine.from_schema(schema).execute()
    watchdog = threading.Timer(MAX_TIME_S, stream.stop)
    watchdog.start()
    try:
        for event in stream:
            if isinstance(event, events.ScenarioFinished):
                record(out, event)
            elif isinstance(event, events.NonFatalError):
                out.errors.append(f"{event.label}: {event.info.format()[:1000]}")
            elif isinstance(event, events.FatalError):
                out.errors.append(f"fatal: {event.exception!r}")
            elif isinstance(event, events.EngineFinished):
                out.stop_reason = str(event.stop_reason)
    finally:
        watchdog.cancel()
    return out


def record(out: Outcome, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    out.requests += len(recorder.interactions)
    if event.status == Status.SUCCESS:
        out.passed.add(recorder.label)
    for interaction in recorder.interactions.values():
        if interaction.response is not None and interaction.response.status_code == 405:
            out.refused_methods.setdefault(recorder.label, set()).add(
                interaction.request.method)
    for checks in recorder.checks.values():
        for check in checks:
            if check.status == Status.FAILURE and check.failure_info is not None:
                f = check.failure_info.failure
                out.failures.append(f"{recorder.label}: {check.name}: {f.title}: "
                                    f"{f.message[:600]}\n  {check.failure_info.code_sample}")


async def test_schemathesis_finds_nothing(settings: Settings) -> None:
    spec = yaml.safe_load(SPEC_PATH.read_text())
    operations = {f"{method.upper()} {path}": set(item)
                  for path, item in spec["paths"].items() for method in item}
    async with running_service(settings) as svc:
        config = engine_config(svc.url, session_token(settings), admin_token(settings))
        out = await trio.to_thread.run_sync(run_engine, config)
    assert out.stop_reason == "completed", f"stopped: {out.stop_reason}"
    assert not out.errors, "\n".join(out.errors)
    assert not out.failures, f"{len(out.failures)} failures:\n" + "\n".join(
        dict.fromkeys(out.failures))
    # Every operation was exercised, and its path asked with methods it does not have.
    assert out.passed == set(operations), sorted(out.passed ^ set(operations))
    assert out.requests > len(operations) * MAX_EXAMPLES, out.requests
    for label, declared in operations.items():
        refused = {m.lower() for m in out.refused_methods.get(label, ())}
        assert {"put", "patch", "delete"} - declared <= refused, (label, refused)
