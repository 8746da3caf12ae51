"""The ``telemetry`` command: serve, demo, token, replay, plot, migrate, sink, config.

Each subcommand loads :class:`Settings` once from the environment. A bad variable
exits with status 2 and a message naming it (``config`` reports it the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

import trio

from telemetry.config import ConfigError, Settings
from telemetry.signals import set_on_signal


async def _serve(settings: Settings) -> None:
    from telemetry.server import serve
    from telemetry.wiring import open_storage

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
        from telemetry.wiring import open_blob_store

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


# ``--help`` is plain text: the module docstring above is for Sphinx, this is for people.
DESCRIPTION = """\
RestartiX Telemetry: pose and media ingest for guided home exercise sessions.

Each command reads its configuration from the environment once at start-up; a
malformed variable stops it with exit status 2 and a message naming the variable.
"""
CONFIG_TABLE = ("The variables, with their defaults and meaning, are in the Configuration "
                "table of README.md (print it with: python -m telemetry.config_report); the "
                "effective values with: telemetry config.")
# The variables a command depends on most, shown in its help with their defaults.
COMMAND_VARIABLES = {
    "serve": ("TELEMETRY_HOST", "TELEMETRY_PORT", "TELEMETRY_DATA_DIR", "TELEMETRY_JWT_KEYS",
              "TELEMETRY_BLOB_STORE", "TELEMETRY_BUS", "TELEMETRY_SINK", "DATABASE_URL"),
    "migrate": ("DATABASE_URL", "TELEMETRY_DATA_DIR"),
    "sink": ("TELEMETRY_SINK_HOST", "TELEMETRY_SINK_PORT", "DATABASE_URL",
             "TELEMETRY_SINK_DATABASE_URL", "TELEMETRY_JWT_KEYS"),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's default shown, except
    those that mean "not given" (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        # Identity, not ==: a default of 0 equals False and must still be shown.
        unset = default is None or default is False or default is argparse.SUPPRESS
        if ("%(default)" in help_text or unset
                or not action.option_strings and action.nargs not in ("?", "*")):
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"


def _configured_by(command: str) -> str:
    from telemetry.config import VARIABLES

    width = max(len(name) for name in COMMAND_VARIABLES[command])
    lines = [f"  {name:<{width}}  default: {_plain(VARIABLES[name][0])}"
             for name in COMMAND_VARIABLES[command]]
    return "\n".join(["configuration (environment), among others:", *lines, "",
                      textwrap.fill(CONFIG_TABLE, 78)])


def _plain(text: str) -> str:
    """A config table cell without its Markdown code marks."""
    return text.replace("`", "")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("restartix-telemetry")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telemetry", description=DESCRIPTION,
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, epilog=epilog,
                              formatter_class=_HelpFormatter)

    command("serve", "run the service (configuration from the environment)",
            _configured_by("serve"))

    d = command("demo", "run the service on loopback and stream simulated patients through it")
    d.add_argument("--patients", type=int, default=5, help="number of simulated patients")
    d.add_argument("--seconds", type=int, default=20, help="length of each session")
    d.add_argument("--seed", type=int, default=7, help="seed of the simulation")
    d.add_argument("--plots", type=Path, default=Path("demo-plots"),
                   help="directory for one PNG per session")

    r = command("replay", "recompute a session's metrics from its replay blob")
    r.add_argument("blob", nargs="?", help="path of a .bin.gz replay blob")
    r.add_argument("--key", help="read ORG_ID/SESSION_ID.bin.gz from the configured blob store")
    pl = command("plot", "draw a session's replay blob as a PNG")
    pl.add_argument("blob", type=Path, help="path of a .bin.gz replay blob")
    pl.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    pl.add_argument("--event", type=Path, help="end-of-session event JSON (shades video stalls)")
    command("migrate", "apply Postgres migrations and create partitions, then exit",
            _configured_by("migrate"))
    command("sink", "run the aggregate sink's HTTP receiver (Core API side)",
            _configured_by("sink"))
    c = command("config", "print the effective configuration (secrets hidden) and where "
                "each value came from", textwrap.fill(CONFIG_TABLE, 78))
    c.add_argument("--check", action="store_true",
                   help="only validate: exit 2 naming a malformed value or an unknown "
                        "TELEMETRY_* variable")
    c.add_argument("--markdown", action="store_true",
                   help="print the README's configuration table instead")

    t = command("token", "mint a development token signed like the Core API's")
    t.add_argument("--org", default="org-dev", help="organisation id")
    t.add_argument("--session", default=None, help="session id (default: random)")
    t.add_argument("--patient", default="patient-dev", help="patient id")
    t.add_argument("--exercise", default="squat", help="exercise kind")
    t.add_argument("--side", choices=["left", "right", "both"], help="side of the exercise")
    t.add_argument("--target-reps", type=int, help="target repetitions")
    t.add_argument("--no-biometric", action="store_true",
                   help="without the patient's biometric consent (pose frames are refused)")
    t.add_argument("--no-analytics", action="store_true",
                   help="without the patient's analytics consent (media events are refused)")
    t.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    t.add_argument("--service", action="store_true", help="a service-account token instead")
    t.add_argument("--scope", default="telemetry:admin", help="scope of a service token")
    t.add_argument("--subject", help="subject of a service token (default: ops)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":  # reports a bad environment itself, with unknown names
        from telemetry.config_report import config_main

        return config_main(os.environ, check=args.check, markdown=args.markdown)
    try:
        settings = Settings.from_env()
        if args.command == "serve":
            from telemetry.preflight import preflight

            preflight(settings)
    except ConfigError as exc:
        if args.command in ("serve", "migrate", "sink"):
            # A service's output is read by a log pipeline: one JSON line, not text.
            from telemetry import logs

            logs.fatal("configuration error; not starting", error=str(exc))
        else:
            print(f"telemetry: configuration error: {exc}", file=sys.stderr)
        return 2
    from telemetry import logs

    if args.command == "serve":
        logs.configure(settings.log_level)
        trio.run(_serve, settings)
    elif args.command == "demo":
        from telemetry.dev.demo import run_demo

        logs.configure(os.environ.get("TELEMETRY_DEMO_LOG_LEVEL", "WARNING"))
        return trio.run(partial(run_demo, settings, args.patients, args.seconds, args.seed,
                                plots=args.plots))
    elif args.command == "replay":
        if not args.blob and not args.key:
            print("telemetry replay: give a BLOB path or --key", file=sys.stderr)
            return 2
        return trio.run(_replay, settings, args)
    elif args.command == "plot":
        from telemetry.dev.plot import plot_main  # lazily: `serve` never loads matplotlib

        return plot_main(args.blob, args.output, args.event)
    elif args.command == "migrate":
        from storage.migrate import migrate_main

        logs.configure(settings.log_level)
        trio.run(partial(migrate_main, Path(settings.data_dir),
                          database_url=settings.database_url))
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
