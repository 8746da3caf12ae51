"""The ``telemetry`` command as a user runs it: a subprocess, its output read back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
# The console script pip installed beside this interpreter (pyproject's [project.scripts]).
SCRIPT = Path(sys.executable).parent / "telemetry"
COMMANDS = ("serve", "demo", "token", "replay", "plot", "migrate", "sink", "config")
# Sphinx/reST markup: roles (:class:`X`, :mod:`x`), ``literals``, `interpreted text`.
MARKUP = re.compile(r":[a-z]+:`|``|`[^`\n]+`")


def run(*argv: str, module: bool = False,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "telemetry.cli", *argv] if module else [str(SCRIPT), *argv]
    # No TELEMETRY_* from the caller's environment: what a user sees on a fresh shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    env.update(extra_env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def readme_table() -> dict[str, str]:
    """README's configuration table: variable -> default."""
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", (ROOT / "README.md").read_text(),
                      re.MULTILINE)
    return {name: default.strip().replace("`", "") for name, default in rows}


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_version_is_the_installed_package_version(module: bool) -> None:
    r = run("--version", module=module)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"telemetry {version('restartix-telemetry')}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_text(command: str | None) -> None:
    r = run(*([command] if command else []), "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: telemetry"), r.stdout
    assert not MARKUP.search(r.stdout), MARKUP.search(r.stdout)


def test_top_level_help_lists_every_command() -> None:
    out = run("--help").stdout
    for command in COMMANDS:
        assert re.search(rf"^    {command} +\w", out, re.MULTILINE), (command, out)
    assert "--version" in out


@pytest.mark.parametrize(("command", "shown"), [
    ("demo", ["--patients PATIENTS  number of simulated patients (default: 5)",
              "(default: 20)", "(default: demo-plots)"]),
    ("token", ["(default: org-dev)", "(default: 3600)", "(default: telemetry:admin)",
               "(default: random)"]),
])
def test_help_shows_defaults(command: str, shown: list[str]) -> None:
    out = " ".join(run(command, "--help").stdout.split())  # unwrapped
    for text in shown:
        assert " ".join(text.split()) in out, (text, out)
    # Flags and options without a default say nothing about one.
    assert "(default: None)" not in out and "(default: False)" not in out


@pytest.mark.parametrize("command", ["serve", "migrate", "sink"])
def test_server_commands_point_to_the_configuration_table(command: str) -> None:
    out = run(command, "--help").stdout
    assert "Configuration table of README.md" in " ".join(out.split())
    assert "python -m telemetry.config" in out
    table = readme_table()
    listed = re.findall(r"^  ([A-Z_]+) +default: (.*)$", out, re.MULTILINE)
    assert listed, out
    for name, default in listed:
        assert table.get(name) == default, (name, default, table.get(name))


def test_a_bad_variable_exits_2_naming_it() -> None:
    env = {**os.environ, "TELEMETRY_PORT": "eighty"}
    r = subprocess.run([str(SCRIPT), "token"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=env)
    assert r.returncode == 2
    assert "TELEMETRY_PORT" in r.stderr


def test_config_prints_every_variable_with_its_source_and_hides_secrets() -> None:
    secret = "do-not-print-" + "x" * 32
    r = run("config", extra_env={"TELEMETRY_PORT": "9000", "TELEMETRY_JWT_KEYS":
                                 f'{{"k-1": "{secret}"}}',
                                 "DATABASE_URL": "postgresql://u:hunter2@db/telemetry"})
    assert r.returncode == 0, r.stderr
    rows = {m[0]: (m[1], m[2]) for m in
            re.findall(r"^([A-Z_]+) +(env|default|derived) +(.*)$", r.stdout, re.MULTILINE)}
    assert set(readme_table()) <= set(rows), set(readme_table()) - set(rows)
    assert rows["TELEMETRY_PORT"] == ("env", "9000")
    assert rows["TELEMETRY_HOST"] == ("default", "127.0.0.1")
    assert rows["TELEMETRY_JWT_SIGNING_KID"] == ("derived", "k-1")
    assert secret not in r.stdout + r.stderr and "hunter2" not in r.stdout + r.stderr


def test_config_check_names_unknown_variables() -> None:
    r = run("config", "--check", extra_env={"TELEMETRY_IDLE_TIMOUT_S": "5"})
    assert r.returncode == 2
    assert "TELEMETRY_IDLE_TIMOUT_S" not in r.stdout
    assert "TELEMETRY_IDLE_TIMOUT_S (did you mean TELEMETRY_IDLE_TIMEOUT_S?)" in r.stderr
    ok = run("config", "--check", extra_env={"TELEMETRY_IDLE_TIMEOUT_S": "5"})
    assert ok.returncode == 0 and "configuration OK" in ok.stdout, ok.stderr
    bad = run("config", "--check", extra_env={"TELEMETRY_PORT": "eighty"})
    assert bad.returncode == 2 and "TELEMETRY_PORT" in bad.stderr


def test_config_markdown_is_the_readme_table() -> None:
    r = run("config", "--markdown")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("env", [
    {"TELEMETRY_JWT_KEYS_FILE": "/nonexistent/keys.json"},
    {"TELEMETRY_TLS_CERT": "/nonexistent/cert.pem", "TELEMETRY_TLS_KEY": "/nonexistent/key.pem"},
    {"TELEMETRY_JWT_PUBLIC_KEYS":
     '{"ec-1": "-----BEGIN PUBLIC KEY-----\\nnot base64\\n-----END PUBLIC KEY-----\\n"}'},
])
def test_config_check_loads_the_files_serve_would(env: dict[str, str]) -> None:
    """A keyset or TLS file that `serve` cannot load fails `config --check` too (it
    used to say "configuration OK", and `serve` then died with a traceback)."""
    from telemetry.config_report import config_main

    assert config_main(env, check=True) == 2
