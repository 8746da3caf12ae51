"""``telemetry sink``: the Core API side of the bus as its own HTTP receiver.

``POST /internal/v1/events`` takes one end-of-session event (``docs/events.md``) from
:class:`storage.http_bus.HttpBus` and hands it to :class:`storage.sink.AggregateSink`.
It needs a service-account token with scope :data:`SINK_SCOPE` and audience
``settings.admin_audience``. Answers (errors use the API's JSON error shape):

* 200 ``{"status": "stored"}`` or ``{"status": "duplicate"}`` (already stored; nothing
  changed) -- both mean "delivered, do not resend";
* 401 bad/missing token, 403 token without the scope;
* 400 body not JSON, malformed event (the message names the field; also text
  Postgres cannot store, NUL or an unpaired surrogate, and any other value the schema
  cannot hold), or an ``Idempotency-Key`` that differs from the event's ``event_id``.
  A 400 is final: :class:`~storage.http_bus.HttpBus` raises
  :class:`~storage.bus.EventRejected` and the outbox sets the event aside at once;
* 413 body over :data:`MAX_EVENT_BYTES` (final too);
* 503 with ``Retry-After`` when Postgres is unreachable (the sender retries);
* 500 for anything else (a bug; the sender retries, the write is all-or-nothing).

``GET /healthz`` answers 200 when Postgres answers, else 503.

:func:`serve_sink` runs it all: database, migrations, partition maintenance, HTTP.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import trio
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from storage.migrate import migrate, run_partition_maintenance
from storage.pg import Database
from storage.sink import AggregateSink, SinkEventError, describe_refusal
from telemetry import errors
from telemetry.auth import AuthError, TokenVerifier, bearer_token
from telemetry.config import Settings
from telemetry.connections import ConnectionGuard
from telemetry.errors import ApiError
from telemetry.server import SEND_TIMEOUT_S, hypercorn_config
from telemetry.signals import set_on_signal

log = logging.getLogger("telemetry.sink")

SINK_SCOPE = "telemetry:sink"
EVENTS_PATH = "/internal/v1/events"
MAX_EVENT_BYTES = 4 * 1024 * 1024
DEFAULT_SINK_PORT = 8081


def create_sink_app(settings: Settings, sink: AggregateSink) -> QuartTrio:
    """The receiver's Quart app. Handlers never block the event loop: the sink's
    writes run in threads under the database's limiter."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_EVENT_BYTES
    errors.register(app)
    verifier = TokenVerifier(settings)

    @app.post(EVENTS_PATH)
    async def receive_event() -> Response:
        try:
            claims = verifier.verify_service(bearer_token(request.headers), SINK_SCOPE)
        except AuthError as exc:
            log.info("sink auth failed", extra={"reason": exc.reason})
            raise ApiError(exc.status, exc.reason, exc.detail) from None
        length = request.content_length
        if length is not None and length > MAX_EVENT_BYTES:
            raise ApiError(413, "body_too_large", f"event exceeds {MAX_EVENT_BYTES} bytes")
        raw = await request.get_data(as_text=False)
        try:
            event: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid_json", "body is not valid JSON") from None
        key = request.headers.get("Idempotency-Key")
        if key is not None and isinstance(event, dict) and key != event.get("event_id"):
            raise ApiError(400, "idempotency_key_mismatch",
                           "Idempotency-Key does not match the event's event_id")
        try:
            status = await sink.store(event)
        except SinkEventError as exc:
            log.info("malformed event rejected", extra={"fault": str(exc),
                                                        "sender": claims.subject})
            raise ApiError(400, "invalid_event", str(exc)) from None
        except psycopg.DataError as exc:
            # A value the schema cannot hold: resending will not help, so 400, which the
            # sender treats as final (a 5xx would be retried for 22-44 minutes).
            log.info("event rejected by the database", extra={
                "fault": type(exc).__name__, "sender": claims.subject})
            raise ApiError(400, "invalid_event", describe_refusal(exc)) from None
        except psycopg.OperationalError as exc:
            log.warning("database unavailable", extra={"error": type(exc).__name__})
            raise ApiError(503, "database_unavailable", "aggregate store is unavailable",
                           retry_after=1) from None
        return jsonify({"status": status})

    @app.get("/healthz")
    async def healthz() -> Response:
        try:
            with trio.fail_after(2):
                await sink.db.run(lambda conn: conn.execute("SELECT 1").fetchone())
        except (psycopg.Error, trio.TooSlowError):
            raise ApiError(503, "database_unavailable", "aggregate store is unavailable",
                           retry_after=1) from None
        return jsonify({"status": "ok"})

    return app


async def serve_sink(
    settings: Settings,
    *,
    host: str,
    port: int,
    database_url: str | None,
    sink_database_url: str | None = None,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the database (embedded when ``database_url`` is None), migrate, start
    partition maintenance, then serve until ``stop`` is set or the task is cancelled.

    ``task_status.started(port)`` reports the bound port once it listens. Start-up
    errors (database, migration) propagate before ``started``. On stop, in-flight
    requests finish (hypercorn's graceful timeout); the database is closed last,
    shielded and bounded, also on cancellation or error.
    """
    db = await Database.open(database_url=database_url, data_dir=Path(settings.data_dir),
                             sink_database_url=sink_database_url)
    try:
        await migrate(db)
        app = create_sink_app(settings, AggregateSink(db))
        async with trio.open_nursery() as nursery:
            await nursery.start(run_partition_maintenance, db)

            async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                config = hypercorn_config(settings, bind=f"{host}:{port}")
                # The same connection guards as the service (telemetry.connections):
                # one client's exception or unread answers must not end or hold it.
                guard = ConnectionGuard(send_timeout_s=SEND_TIMEOUT_S,
                                        frame_cap=settings.max_body_bytes)

                async def trigger() -> None:
                    if stop is None:
                        await trio.sleep_forever()
                    await stop.wait()
                    guard.begin_shutdown(config.graceful_timeout)

                with guard.serving():
                    await hypercorn_serve(app, config, shutdown_trigger=trigger,
                                          task_status=task_status)
                nursery.cancel_scope.cancel()  # HTTP done: stop maintenance too

            binds = await nursery.start(run_http)
            bound = int(binds[0].rsplit(":", 1)[1])
            log.info("sink listening", extra={"port": bound})
            task_status.started(bound)
    finally:
        await db.aclose()


async def run_sink(settings: Settings, host: str, port: int, database_url: str | None,
                sink_database_url: str | None) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_on_signal, stop)
        bound = await nursery.start(partial(
            serve_sink, settings, host=host, port=port, database_url=database_url,
            sink_database_url=sink_database_url, stop=stop,
        ))
        # The one line on stdout: how a parent process learns the bound port.
        print(f"telemetry sink listening on http://{host}:{bound}", flush=True)
        # Both tasks end once a signal sets stop: serve_sink after a graceful drain.


def main() -> int:
    """``python -m telemetry.sink_app``: Settings from the environment, plus
    ``TELEMETRY_SINK_PORT`` (default 8081), ``DATABASE_URL`` (unset: embedded) and
    ``TELEMETRY_SINK_DATABASE_URL`` (the sink role's own URL, optional)."""
    from telemetry.config import ConfigError

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"telemetry sink: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, stream=sys.stderr)
    trio.run(run_sink, settings, settings.sink_host, settings.sink_port,
             settings.database_url, settings.sink_database_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
