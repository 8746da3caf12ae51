"""The service's entry point: one root nursery and the shutdown order.

Modelled on hypercorn's trio worker. Start-up: storage, then the supervisor, then
the HTTP server; ``task_status.started(port)`` once it listens. Shutdown, when
``stop`` is set (SIGTERM/SIGINT in the CLI):

1. readiness goes false, so the load balancer stops routing here;
2. hypercorn stops accepting and lets in-flight requests finish (graceful timeout);
3. the supervisor hands every live session over to the spool (or, with
   ``TELEMETRY_SHUTDOWN_MODE=finalise``, ends it) under ``shutdown_deadline_s``;
4. the outbox gets a moment to deliver; what is left waits on disk;
5. storage is closed, shielded and time-bounded.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from actors.supervisor import Supervisor
from domain.privacy import Pseudonymiser
from telemetry.app import AppState, create_app
from telemetry.asgi import trusted_client
from telemetry.auth import TokenVerifier
from telemetry.config import Settings
from telemetry.connection_close import close_on_connection_close
from telemetry.connections import ConnectionGuard
from telemetry.cors import cors
from telemetry.tls import apply_tls, hsts
from telemetry.wiring import Storage
from telemetry.wsdeflate import refuse_permessage_deflate

log = logging.getLogger("telemetry.server")

# Behind an ALB with a 60 s idle timeout the server must keep connections open
# longer than the balancer does, or the balancer reuses a socket we just closed (502s).
KEEP_ALIVE_TIMEOUT_S = 75.0
# Requests finish in milliseconds; a longer grace only prolongs hypercorn 0.18's
# shutdown race (a reused keep-alive connection waits out the whole grace period).
GRACEFUL_TIMEOUT_S = 5.0
BACKLOG = 2048
# A connection whose client takes nothing we send for this long is closed
# (telemetry.connections); at shutdown the graceful timeout bounds it instead.
SEND_TIMEOUT_S = 20.0
WEBSOCKET_PING_S = 20.0
# What the outbox may still deliver at shutdown; the rest waits on disk.
OUTBOX_FLUSH_S = 3.0


def hypercorn_config(settings: Settings, *, bind: str | None = None) -> Config:
    """Hypercorn settings for a service behind a load balancer (see the constants);
    ``bind`` overrides ``host:port`` from ``settings`` (the sink has its own port)."""
    config = Config()
    config.bind = [bind or f"{settings.host}:{settings.port}"]
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.backlog = BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # A pose stream message is one batch: the POST body cap applies. Pings keep idle
    # streams open through load balancers (the ALB's idle timeout is 60 s).
    config.websocket_max_message_size = settings.max_body_bytes
    config.websocket_ping_interval = WEBSOCKET_PING_S
    refuse_permessage_deflate()
    return config


async def serve(
    settings: Settings,
    storage: Storage,
    *,
    stop: trio.Event,
    task_status: trio.TaskStatus[AppState] = trio.TASK_STATUS_IGNORED,
) -> AppState:
    """Run the service until ``stop`` is set, then shut down in order.

    ``task_status.started`` gets the :class:`AppState` (its ``port`` is the bound
    port; its supervisor and metrics are live) once the server listens."""
    pseudonyms = Pseudonymiser(settings.pseudonym_key)
    supervisor = Supervisor(settings, store=storage.store, bus=storage.bus, pseudonyms=pseudonyms,
                            spool=storage.spool)
    state = AppState(settings, supervisor, TokenVerifier(settings), pseudonyms, storage=storage)
    app = close_on_connection_close(cors(
        create_app(state), settings.cors_origins,
        on_refused=lambda code: state.metrics.cors_refused.labels(code).inc()))
    # Outermost: the client address is settled before anything reads it.
    app = trusted_client(app, settings.trusted_proxies)
    config = hypercorn_config(settings)
    if apply_tls(config, settings):
        app = hsts(app)
    guard = ConnectionGuard(
        send_timeout_s=SEND_TIMEOUT_S, frame_cap=settings.max_body_bytes,
        on_error=lambda kind: state.metrics.connection_errors.labels(kind).inc(),
        on_drop=lambda reason: state.metrics.connections_dropped.labels(reason).inc())
    http_stopped = trio.Event()
    http_done = trio.Event()

    async with trio.open_nursery() as root:
        # Key rotation without restart: SIGHUP or a change of the keys file.
        await root.start(state.verifier.keystore.watch)
        # Storage's own tasks first: recovery (in supervisor.run) writes to the spool
        # and publishes through the outbox.
        if storage.spool is not None:
            await root.start(storage.spool.run)
        if storage.outbox is not None:
            await root.start(storage.outbox.run)
        await root.start(storage.run_maintenance)
        await root.start(supervisor.run)

        async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                # One client's exception, or a client that never reads, must not
                # end the server or hold its shutdown (telemetry.connections).
                with guard.serving():
                    await hypercorn_serve(
                        app, config, shutdown_trigger=http_stopped.wait,
                        task_status=task_status,
                    )
            finally:
                http_done.set()

        state.port = port = _port(await root.start(run_http))
        if settings.uses_dev_keys:
            log.warning("running with the development JWT keys; set TELEMETRY_JWT_KEYS")
        log.info("listening", extra={"port": port})
        task_status.started(state)
        await stop.wait()

        log.info("shutting down: readiness false, draining requests")
        state.ready = False
        if state.streams is not None:
            # Streams end after the batch in hand (close 1012): hypercorn's drain
            # does not close WebSockets, it would wait out its graceful timeout.
            state.streams.close_all()
        # Sends blocked on clients that do not read end with hypercorn's grace.
        guard.begin_shutdown(config.graceful_timeout)
        http_stopped.set()
        # hypercorn returns once in-flight requests are done (or its graceful timeout
        # passed); only then may sessions be ended, or a batch could be acknowledged
        # to an actor that has already finalised.
        await http_done.wait()
        left = await supervisor.drain()
        undelivered = await storage.flush_outbox(OUTBOX_FLUSH_S)
        # The spool committer, outbox and maintenance have nothing left to serve.
        root.cancel_scope.cancel()
        log.info("shutdown complete", extra={"unfinished_sessions": left,
                                             "outbox_left": undelivered})
    return state


def _port(binds: list[str]) -> int:
    # hypercorn reports binds as "http://127.0.0.1:PORT"
    return int(binds[0].rsplit(":", 1)[1])
