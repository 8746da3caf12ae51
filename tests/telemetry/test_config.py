import json
import re
from pathlib import Path

import pytest

from telemetry.config import VARIABLES, ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_need_no_environment() -> None:
    s = Settings.from_env({})
    assert s.uses_dev_keys and s.jwt_algorithms == ("HS256",)


def test_values_parsed() -> None:
    s = Settings.from_env({
        "TELEMETRY_PORT": "9000",
        "TELEMETRY_JWT_KEYS": json.dumps({"a": "x" * 32, "b": "y" * 32}),
        "TELEMETRY_JWT_SIGNING_KID": "b", "TELEMETRY_IDLE_TIMEOUT_S": "2.5",
    })
    assert s.port == 9000 and s.jwt_signing_kid == "b" and s.idle_timeout_s == 2.5


@pytest.mark.parametrize(("env", "names"), [
    ({"TELEMETRY_PORT": "eighty"}, "TELEMETRY_PORT"),
    ({"TELEMETRY_JWT_KEYS": "{"}, "TELEMETRY_JWT_KEYS"),
    ({"TELEMETRY_JWT_KEYS": '{"a": "short"}'}, "TELEMETRY_JWT_KEYS"),
    ({"TELEMETRY_JWT_ALGORITHMS": "none"}, "TELEMETRY_JWT_ALGORITHMS"),
    ({"TELEMETRY_JWT_SIGNING_KID": "zzz"}, "TELEMETRY_JWT_SIGNING_KID"),
    ({"TELEMETRY_MAILBOX_SIZE": "0"}, "TELEMETRY_MAILBOX_SIZE"),
])
def test_bad_values_name_the_variable(env: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


def test_every_variable_documented_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, re.M))
    assert set(VARIABLES) <= documented, set(VARIABLES) - documented
    code = (ROOT / "telemetry/config.py").read_text()
    used = set(re.findall(r'"((?:TELEMETRY|DATABASE)_[A-Z0-9_]+)"', code))
    assert used <= set(VARIABLES), used - set(VARIABLES)
