"""The ``telemetry`` command: serve, demo, token, replay, plot, migrate, sink.

Each subcommand loads :class:`Settings` once from the environment. A bad variable
exits with status 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from telemetry.config import ConfigError, Settings
from telemetry.signals import set_on_signal


async def _serve(settings: Settings) -> None:
    from storage.wiring import open_storage
    from telemetry.server import serve

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_on_signal, stop)
        async with open_storage(settings) as storage:
            await serve(settings, storage, stop=stop)
        nursery.cancel_scope.cancel()


def _token(settings: Settings, args: argparse.Namespace) -> str:
    from telemetry.auth import mint_service_token, mint_session_token

    if args.service:
        return mint_service_token(settings, subject=args.subject or "ops", scope=args.scope,
                                  ttl_s=args.ttl)
    exercise: dict[str, Any] = {"kind": args.exercise}
    if args.side:
        exercise["side"] = args.side
    if args.target_reps:
        exercise["target_reps"] = args.target_reps
    return mint_session_token(
        settings, org_id=args.org, session_id=args.session, patient_id=args.patient,
        exercise=exercise, biometric=not args.no_biometric, analytics=not args.no_analytics,
        ttl_s=args.ttl,
    )


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from actors.replay_metrics import recompute
    from storage.replay import ReplayFormatError, read_replay

    if args.key:
        from storage.wiring import open_blob_store

        store = open_blob_store(settings)
        try:
            data = await store.get(args.key)
        finally:
            await store.aclose()
    else:
        data = await trio.Path(args.blob).read_bytes()
    try:
        result = recompute(read_replay(data))
    except ReplayFormatError as exc:
        print(f"telemetry replay: not a valid replay blob: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telemetry", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service (configuration from the environment)")

    d = sub.add_parser("demo", help="run the service and stream simulated patients through it")
    d.add_argument("--patients", type=int, default=5)
    d.add_argument("--seconds", type=int, default=20, help="length of each session")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--plots", type=Path, default=Path("demo-plots"),
                   help="directory for one PNG per session")

    r = sub.add_parser("replay", help="recompute a session's metrics from its replay blob")
    r.add_argument("blob", nargs="?", help="path of a .bin.gz replay blob")
    r.add_argument("--key", help="read {org_id}/{session_id}.bin.gz from the configured store")
    pl = sub.add_parser("plot", help="draw a session's replay blob as a PNG")
    pl.add_argument("blob", type=Path, help="path of a .bin.gz replay blob")
    pl.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    pl.add_argument("--event", type=Path, help="end-of-session event JSON (shades video stalls)")
    sub.add_parser("migrate", help="apply Postgres migrations and create partitions, then exit")
    sub.add_parser("sink", help="run the aggregate sink's HTTP receiver (Core API side)")

    t = sub.add_parser("token", help="mint a development token signed like the Core API's")
    t.add_argument("--org", default="org-dev")
    t.add_argument("--session", default=None, help="session id (default: random)")
    t.add_argument("--patient", default="patient-dev")
    t.add_argument("--exercise", default="squat")
    t.add_argument("--side", choices=["left", "right", "both"])
    t.add_argument("--target-reps", type=int)
    t.add_argument("--no-biometric", action="store_true")
    t.add_argument("--no-analytics", action="store_true")
    t.add_argument("--ttl", type=int, default=3600)
    t.add_argument("--service", action="store_true", help="a service-account token instead")
    t.add_argument("--scope", default="telemetry:admin")
    t.add_argument("--subject")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"telemetry: configuration error: {exc}", file=sys.stderr)
        return 2
    from telemetry import logs

    if args.command == "serve":
        logs.configure(settings.log_level)
        trio.run(_serve, settings)
    elif args.command == "demo":
        from telemetry.demo import run_demo

        logs.configure(os.environ.get("TELEMETRY_DEMO_LOG_LEVEL", "WARNING"))
        return trio.run(partial(run_demo, settings, args.patients, args.seconds, args.seed,
                                plots=args.plots))
    elif args.command == "replay":
        if not args.blob and not args.key:
            print("telemetry replay: give a BLOB path or --key", file=sys.stderr)
            return 2
        return trio.run(_replay, settings, args)
    elif args.command == "plot":
        from telemetry.plot import plot_main  # lazily: `serve` never loads matplotlib

        return plot_main(args.blob, args.output, args.event)
    elif args.command == "migrate":
        from storage.migrate import migrate_main

        logs.configure(settings.log_level)
        trio.run(partial(migrate_main, settings, database_url=settings.database_url))
    elif args.command == "sink":
        from telemetry.sink_app import run_sink

        logs.configure(settings.log_level)
        trio.run(run_sink, settings, settings.sink_host, settings.sink_port,
                 settings.database_url, settings.sink_database_url)
    elif args.command == "token":
        print(_token(settings, args))
    else:  # pragma: no cover - argparse rejects unknown commands
        print(json.dumps({"error": f"unknown command {args.command}"}), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
