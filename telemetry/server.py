"""The service's entry point: the lifecycle, by structure.

Modelled on hypercorn's trio worker (``hypercorn/trio/run.py``): each layer is a
block nested in the one it needs, so leaving a block is that layer's shutdown step
and the order cannot drift::

    open_storage(settings)                  the caller (CLI, tests); closes storage
      _services(...)                        spool committer, outbox, key watcher,
                                            partition maintenance; on leaving: the
                                            outbox gets OUTBOX_FLUSH_S, then all stop
        _hosting(supervisor)                recovery, then the actors; on leaving:
                                            drain (sessions handed over to the spool,
                                            or ended, under shutdown_deadline_s)
          _serving_http(...)                hypercorn; on leaving: readiness false,
                                            streams closed (1012), in-flight requests
                                            finish (graceful timeout)
            task_status.started(state); await stop.wait()

Each long-running task is started with ``nursery.start`` (it says when it is
ready). Each exit step runs in a shielded, time-bounded cancel scope, so a
cancelled shutdown (the caller's scope) still takes it, and a stuck one cannot
hold the process past its bound; what it could not finish waits on disk for the
next start. ``stop`` is set by SIGTERM/SIGINT in the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

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
from telemetry.wiring import Storage, actor_limits
from telemetry.wsdeflate import refuse_permessage_deflate

log = logging.getLogger("telemetry.server")

# Behind an ALB with a 60 s idle timeout the server must keep connections open
# longer than the balancer does, or the balancer reuses a socket we just closed (502s).
KEEP_ALIVE_TIMEOUT_S = 75.0
# Requests finish in milliseconds. hypercorn gives its connections this long to end
# at shutdown, and a WebSocket connection always takes all of it: its ping task
# sleeps for the whole ping interval and holds the connection open until hypercorn
# cancels it at this deadline. Both are parameters of serve() (tests pass short ones).
GRACEFUL_TIMEOUT_S = 5.0
BACKLOG = 2048
# A connection whose client takes nothing we send for this long is closed
# (telemetry.connections); at shutdown the graceful timeout bounds it instead.
SEND_TIMEOUT_S = 20.0
# Pings keep idle streams open through load balancers (the ALB's idle timeout is 60 s).
WEBSOCKET_PING_S = 20.0
# What the outbox may still deliver at shutdown; the rest waits on disk.
OUTBOX_FLUSH_S = 3.0
# Beyond each exit step's own bound: what its bookkeeping may take at most.
_EXIT_MARGIN_S = 5.0


def hypercorn_config(settings: Settings, *, bind: str | None = None,
                     graceful_timeout_s: float = GRACEFUL_TIMEOUT_S,
                     websocket_ping_s: float | None = WEBSOCKET_PING_S) -> Config:
    """Hypercorn settings for a service behind a load balancer (see the constants);
    ``bind`` overrides ``host:port`` from ``settings`` (the sink has its own port).
    ``websocket_ping_s=None``: no pings."""
    config = Config()
    config.bind = [bind or f"{settings.host}:{settings.port}"]
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.graceful_timeout = graceful_timeout_s
    config.backlog = BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # A pose stream message is one batch: the POST body cap applies.
    config.websocket_max_message_size = settings.max_body_bytes
    config.websocket_ping_interval = websocket_ping_s
    refuse_permessage_deflate()
    return config


@dataclass
class ShutdownReport:
    """What each exit step left for the next start (logged at the end)."""

    unfinished_sessions: int = 0
    outbox_left: int = 0


async def serve(
    settings: Settings,
    storage: Storage,
    *,
    stop: trio.Event,
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S,
    websocket_ping_s: float | None = WEBSOCKET_PING_S,
    task_status: trio.TaskStatus[AppState] = trio.TASK_STATUS_IGNORED,
) -> AppState:
    """Run the service on ``storage`` until ``stop`` is set, then shut down layer by
    layer (see the module docstring).

    ``task_status.started`` gets the :class:`AppState` (its ``port`` is the bound
    port; its supervisor and metrics are live) once the server listens.
    ``graceful_timeout_s`` and ``websocket_ping_s`` are hypercorn's (see
    :func:`hypercorn_config`). Cancellation: every exit step still runs, shielded
    and bounded, and ``Cancelled`` propagates afterwards."""
    pseudonyms = Pseudonymiser(settings.pseudonym_key)
    supervisor = Supervisor(actor_limits(settings), store=storage.store, bus=storage.bus,
                            pseudonyms=pseudonyms, journal=storage.journal,
                            ownership=storage.ownership)
    state = AppState(settings, supervisor, TokenVerifier(settings), pseudonyms, storage=storage)
    app = close_on_connection_close(cors(
        create_app(state), settings.cors_origins,
        on_refused=lambda code: state.metrics.cors_refused.labels(code).inc()))
    # Outermost: the client address is settled before anything reads it.
    app = trusted_client(app, settings.trusted_proxies)
    config = hypercorn_config(settings, graceful_timeout_s=graceful_timeout_s,
                              websocket_ping_s=websocket_ping_s)
    if apply_tls(config, settings):
        app = hsts(app)
    guard = ConnectionGuard(
        send_timeout_s=SEND_TIMEOUT_S, frame_cap=settings.max_body_bytes,
        on_error=lambda kind: state.metrics.connection_errors.labels(kind).inc(),
        on_drop=lambda reason: state.metrics.connections_dropped.labels(reason).inc())
    report = ShutdownReport()

    async with _services(storage, state, report), \
            _hosting(supervisor, settings.shutdown_deadline_s, report), \
            _serving_http(app, config, guard, state) as port:
        state.port = port
        if settings.uses_dev_keys:
            log.warning("running with the development JWT keys; set TELEMETRY_JWT_KEYS")
        log.info("listening", extra={"port": port})
        task_status.started(state)
        await stop.wait()
        log.info("shutting down: readiness false, draining requests")
    log.info("shutdown complete", extra={"unfinished_sessions": report.unfinished_sessions,
                                         "outbox_left": report.outbox_left})
    return state


@contextmanager
def _exit_step(bound_s: float) -> Iterator[trio.CancelScope]:
    """A shutdown step: shielded from the caller's cancellation, and bounded."""
    with trio.move_on_after(bound_s) as scope:
        scope.shield = True
        yield scope


@asynccontextmanager
async def _services(storage: Storage, state: AppState,
                    report: ShutdownReport) -> AsyncIterator[None]:
    """Storage's long-running tasks and the key watcher, started in order (each is
    ready when ``start`` returns): recovery, in the supervisor, writes to the spool
    and publishes through the outbox. On leaving, the outbox gets ``OUTBOX_FLUSH_S``
    to deliver (the rest waits on disk), then every task is cancelled."""
    async with trio.open_nursery() as nursery:
        # Key rotation without restart: SIGHUP or a change of the keys file.
        await nursery.start(state.verifier.keystore.watch)
        if storage.spool is not None:
            await nursery.start(storage.spool.run)
        if storage.outbox is not None:
            await nursery.start(storage.outbox.run)
        await nursery.start(storage.run_maintenance)
        try:
            yield
        finally:
            with _exit_step(OUTBOX_FLUSH_S + _EXIT_MARGIN_S):
                report.outbox_left = await storage.flush_outbox(OUTBOX_FLUSH_S)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _hosting(supervisor: Supervisor, deadline_s: float,
                   report: ShutdownReport) -> AsyncIterator[None]:
    """The supervisor: recovery, then the actors. On leaving, every live session is
    handed over (or ended) and finalisations in flight get ``deadline_s``; what is
    still running then is cancelled when the supervisor's nursery exits."""
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        try:
            yield
        finally:
            with _exit_step(deadline_s + _EXIT_MARGIN_S):
                report.unfinished_sessions = await supervisor.drain(deadline_s)
            # drain() ends supervisor.run; a shutdown cut short must not wait for it
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _serving_http(app: Any, config: Config, guard: ConnectionGuard,
                        state: AppState) -> AsyncIterator[int]:
    """hypercorn on ``config``; yields the bound port once it listens. On leaving:
    readiness false (the load balancer stops routing here), streams closed after
    the batch in hand, and in-flight requests finish within the graceful timeout;
    only then may the supervisor end sessions, or a batch could be acknowledged to
    an actor that has already finalised."""
    stopped = trio.Event()
    done = trio.Event()

    async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            # One client's exception, or a client that never reads, must not
            # end the server or hold its shutdown (telemetry.connections).
            with guard.serving():
                await hypercorn_serve(app, config, shutdown_trigger=stopped.wait,
                                      task_status=task_status)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        port = _port(await nursery.start(run_http))
        try:
            yield port
        finally:
            state.ready = False
            if state.streams is not None:
                # Streams end after the batch in hand (close 1012): hypercorn's drain
                # does not close WebSockets, it would wait out its graceful timeout.
                state.streams.close_all()
            # Sends blocked on clients that do not read end with hypercorn's grace.
            guard.begin_shutdown(config.graceful_timeout)
            stopped.set()
            with _exit_step(config.graceful_timeout + _EXIT_MARGIN_S):
                await done.wait()
            nursery.cancel_scope.cancel()


def _port(binds: list[str]) -> int:
    # hypercorn reports binds as "http://127.0.0.1:PORT"
    return int(binds[0].rsplit(":", 1)[1])
