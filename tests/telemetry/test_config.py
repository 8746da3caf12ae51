import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from telemetry.config import VARIABLES, ConfigError, Settings, markdown_table
from telemetry.config_report import (
    OTHER_VARIABLES,
    TARGETS,
    config_main,
    effective,
    generated,
    unknown_variables,
)
from telemetry.config_spec import AtLeast, Between, OneOf, number, redact_url, specs

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
    # Refused at start-up, not at the first batch (the replay writer would answer 500).
    ({"TELEMETRY_BLOB_ENCODING": "bogus"}, "TELEMETRY_BLOB_ENCODING='bogus': must be one of"),
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


# -- one declaration per setting ---------------------------------------------------------


def _bounded(kind: type) -> list[tuple[str, str, Any]]:
    """(attribute, variable, check) of every setting whose check is ``kind``."""
    return [(f.name, spec.env, spec.check) for f, spec in specs(Settings)
            if isinstance(spec.check, kind)]


def test_every_field_is_declared_once() -> None:
    declared = [f.name for f, _ in specs(Settings)]
    assert declared == [f.name for f in dataclasses.fields(Settings)]
    assert list(VARIABLES) == [spec.env for _, spec in specs(Settings)]
    assert len(set(VARIABLES)) == len(VARIABLES)


def test_from_env_of_nothing_is_the_declared_defaults() -> None:
    loaded, built = Settings.from_env({}), Settings()
    for f in dataclasses.fields(Settings):
        if f.name != "pseudonym_key":  # random per process
            assert getattr(loaded, f.name) == getattr(built, f.name), f.name


@pytest.mark.parametrize(("attr", "value", "variable"), [
    ("mailbox_size", 0, "TELEMETRY_MAILBOX_SIZE"),
    ("port", -1, "TELEMETRY_PORT"),
    ("gap_timeout_s", 0.0, "TELEMETRY_GAP_TIMEOUT_S"),
    ("max_batches_per_s", float("nan"), "TELEMETRY_MAX_BATCHES_PER_S"),
    ("max_body_bytes", "big", "TELEMETRY_MAX_BODY_BYTES"),
    ("blob_store", "gcs", "TELEMETRY_BLOB_STORE"),
    ("blob_encoding", "bogus", "TELEMETRY_BLOB_ENCODING"),
    ("log_level", "LOUD", "TELEMETRY_LOG_LEVEL"),
    ("jwt_algorithms", ("none",), "TELEMETRY_JWT_ALGORITHMS"),
    ("jwt_algorithms", (), "TELEMETRY_JWT_ALGORITHMS"),
])
def test_a_directly_built_settings_out_of_bounds_is_refused(
    attr: str, value: Any, variable: str
) -> None:
    with pytest.raises(ConfigError, match=rf"Settings\.{attr}: {variable}="):
        Settings(**{attr: value})
    with pytest.raises(ConfigError, match=variable):
        dataclasses.replace(Settings(), **{attr: value})


@pytest.mark.parametrize(("attr", "variable", "check"), _bounded(AtLeast))
def test_every_lower_bound_holds_from_env_and_directly(
    attr: str, variable: str, check: AtLeast
) -> None:
    assert getattr(Settings.from_env({variable: str(check.minimum)}), attr) == check.minimum
    with pytest.raises(ConfigError, match=f"{variable}=.* is below the minimum"):
        Settings.from_env({variable: str(check.minimum - 1)})
    with pytest.raises(ConfigError, match=variable):
        Settings(**{attr: check.minimum - 1})


@pytest.mark.parametrize(("attr", "variable", "check"), _bounded(OneOf))
def test_every_enumeration_holds_from_env_and_directly(
    attr: str, variable: str, check: OneOf
) -> None:
    companions = {"TELEMETRY_BUS_URL": "http://core.internal/events",
                  "TELEMETRY_NATS_URLS": "nats://nats-1:4222"}
    for value in check.allowed:
        assert getattr(Settings.from_env({variable: value, **companions}), attr) == value
    with pytest.raises(ConfigError, match=f"(?i){variable}='bogus': must be one of"):
        Settings.from_env({variable: "bogus"})
    with pytest.raises(ConfigError, match=variable):
        Settings(**{attr: "bogus"})


@pytest.mark.parametrize(("attr", "variable", "check"), _bounded(Between))
def test_every_upper_bound_holds_from_env_and_directly(
    attr: str, variable: str, check: Between
) -> None:
    assert getattr(Settings.from_env({variable: str(check.maximum)}), attr) == check.maximum
    with pytest.raises(ConfigError, match=f"{variable}=.* is above the maximum"):
        Settings.from_env({variable: str(check.maximum + 1)})
    with pytest.raises(ConfigError, match=variable):
        Settings(**{attr: check.maximum + 1})


@pytest.mark.parametrize("variable", ["TELEMETRY_PORT", "TELEMETRY_SINK_PORT",
                                      "TELEMETRY_JWT_LEEWAY_S",
                                      "TELEMETRY_JWT_MAX_LIFETIME_S"])
def test_ports_and_token_time_rules_have_an_upper_bound(variable: str) -> None:
    # An unbounded leeway or lifetime switches the check off (a year-old token verified
    # with TELEMETRY_JWT_LEEWAY_S=1e9); a port above 65535 failed only at bind.
    assert variable in {v for _, v, _ in _bounded(Between)}
    with pytest.raises(ConfigError, match=f"{variable}=.* is above the maximum"):
        Settings.from_env({variable: "1000000000"})


@pytest.mark.parametrize(("attr", "variable"),
                         [(a, v) for a, v, _ in _bounded(AtLeast)])
@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "Infinity"])
def test_no_numeric_setting_takes_a_non_finite_value(attr: str, variable: str,
                                                      raw: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: raw})
    with pytest.raises(ConfigError, match=rf"Settings\.{attr}: {variable}="):
        Settings(**{attr: float(raw)})


def test_numbers_are_finite() -> None:
    assert number("X", "2.5") == 2.5
    for raw in ("inf", "-inf", "nan", "1e400"):
        with pytest.raises(ConfigError, match=f"X='{raw}' is not a finite number"):
            number("X", raw)


def test_the_pseudonym_key_is_at_least_32_bytes() -> None:
    key = "P" * 31
    with pytest.raises(ConfigError, match="TELEMETRY_PSEUDONYM_KEY is 31 bytes; at least 32"
                       ) as refused:
        Settings.from_env({"TELEMETRY_PSEUDONYM_KEY": key})
    assert key not in str(refused.value)  # a secret: only its length is said
    assert Settings.from_env({"TELEMETRY_PSEUDONYM_KEY": key + "P"}).pseudonym_key == b"P" * 32
    with pytest.raises(ConfigError, match=r"Settings\.pseudonym_key: TELEMETRY_PSEUDONYM_KEY"):
        Settings(pseudonym_key=b"x")
    assert len(Settings().pseudonym_key) == 32  # the random default


def test_rules_linking_two_variables_apply_to_the_environment() -> None:
    with pytest.raises(ConfigError, match="TELEMETRY_TLS_CERT and TELEMETRY_TLS_KEY"):
        Settings.from_env({"TELEMETRY_TLS_CERT": "/c.pem"})
    with pytest.raises(ConfigError, match="TELEMETRY_BUS_URL"):
        Settings.from_env({"TELEMETRY_BUS": "http"})
    with pytest.raises(ConfigError, match="TELEMETRY_NATS_URLS"):
        Settings.from_env({"TELEMETRY_JOURNAL": "jetstream"})
    with pytest.raises(ConfigError, match="TELEMETRY_NATS_URLS: not a nats"):
        Settings.from_env({"TELEMETRY_NATS_URLS": "http://nats-1:4222"})
    assert Settings.from_env({"TELEMETRY_NATS_URLS": "nats://a:4222, tls://b:4222"}
                             ).nats_urls == ("nats://a:4222", "tls://b:4222")
    # Built directly, a partial TLS pair is left for the TLS loader to refuse (test_tls).
    assert Settings(tls_cert=Path("/c.pem")).tls_key is None


@pytest.mark.parametrize(("path", "make"), list(TARGETS.items()),
                         ids=[p.name for p in TARGETS])
def test_generated_tables_match_the_declarations(path: Path, make: Any) -> None:
    assert generated(path.read_text()) == make(), (
        f"{path.relative_to(ROOT)} is stale: run python -m telemetry.config_report --write")


def test_markdown_table_is_the_readme_table() -> None:
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_variables_read_elsewhere_are_really_read() -> None:
    code = "\n".join(p.read_text() for d in ("telemetry", "actors", "storage")
                     for p in (ROOT / d).rglob("*.py") if p.name != "config_report.py")
    code += (ROOT / "Dockerfile").read_text()
    for name in OTHER_VARIABLES:
        if name.startswith("TELEMETRY_"):
            assert name in code, name


# -- telemetry config --------------------------------------------------------------------


def test_unknown_variables_are_named_with_the_closest_known_one() -> None:
    env = {"TELEMETRY_PORTT": "1", "TELEMETRY_IDLE_TIMOUT_S": "3", "TELEMETRY_ZZZ": "1",
           "TELEMETRY_PORT": "80", "TELEMETRY_BUILD_COMMIT": "abc", "HOME": "/root"}
    assert unknown_variables(env) == [
        ("TELEMETRY_IDLE_TIMOUT_S", "TELEMETRY_IDLE_TIMEOUT_S"),
        ("TELEMETRY_PORTT", "TELEMETRY_PORT"),
        ("TELEMETRY_ZZZ", None),
    ]


def test_check_exits_2_listing_unknown_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_main({"TELEMETRY_MAILBOX_SIZ": "4"}, check=True) == 2
    err = capsys.readouterr().err
    assert "TELEMETRY_MAILBOX_SIZ (did you mean TELEMETRY_MAILBOX_SIZE?)" in err
    assert config_main({"TELEMETRY_MAILBOX_SIZE": "4"}, check=True) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert config_main({"TELEMETRY_MAILBOX_SIZE": "0"}, check=True) == 2
    assert "TELEMETRY_MAILBOX_SIZE=0 is below the minimum 1" in capsys.readouterr().err


SECRETS = {
    "TELEMETRY_JWT_KEYS": json.dumps({"k-1": "S1-" + "a" * 40, "k-2": "S2-" + "b" * 40}),
    "TELEMETRY_PSEUDONYM_KEY": "S3-pseudonym-key-material-of-32-bytes",
    "TELEMETRY_BUS_TOKEN": "S4.bus.token",
    "DATABASE_URL": "postgresql://telemetry:S5pass@db.internal:5432/telemetry",
    "TELEMETRY_SINK_DATABASE_URL": "postgresql://sink@db.internal/telemetry?password=S6pass",
    "AWS_ACCESS_KEY_ID": "S7AKIA",
    "AWS_SECRET_ACCESS_KEY": "S8aws-secret",
}


def test_secrets_are_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    env = {**SECRETS, "TELEMETRY_PORT": "9000", "TELEMETRY_TYPO": "x"}
    assert config_main(env) == 0
    out, err = capsys.readouterr()
    for secret in ("S1-", "S2-", "S3-", "S4.", "S5pass", "S6pass", "S7AKIA", "S8aws"):
        assert secret not in out + err, secret
        assert secret not in repr(Settings.from_env(env)), secret
    assert "kids k-1, k-2" in out and "postgresql://telemetry:***@db.internal" in out
    assert "TELEMETRY_TYPO" in err


def test_a_keyword_database_url_is_printed_without_its_password(
    capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"DATABASE_URL": "host=db.internal user=telemetry password=S5pass dbname=t",
           "TELEMETRY_SINK_DATABASE_URL": "host=db.internal user=sink password='S6 pass'"}
    assert config_main(env) == 0
    out, err = capsys.readouterr()
    assert "S5pass" not in out + err and "S6" not in out + err
    assert "host=db.internal user=telemetry password=*** dbname=t" in out


def test_a_refused_nats_url_is_named_without_its_credentials(
    capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"TELEMETRY_NATS_URLS": "nats://ok:4222, NATS://telemetry:S9pass@nats-1:4222, "
                                  "telemetry:S9pass@nats-2:4222"}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert str(refused.value) == ("TELEMETRY_NATS_URLS: not a nats:// or tls:// URL: "
                                  "NATS://telemetry:***@nats-1:4222, (not a URL, hidden)")
    assert config_main(env, check=True) == 2
    assert "S9pass" not in capsys.readouterr().err


def test_effective_configuration_says_where_each_value_came_from() -> None:
    env = {"TELEMETRY_PORT": "9000", "TELEMETRY_ENV": "prod"}
    rows = {name: (value, where)
            for name, value, where in effective(Settings.from_env(env), env)}
    assert set(VARIABLES) <= set(rows)
    assert rows["TELEMETRY_PORT"] == ("9000", "env")
    assert rows["TELEMETRY_HOST"] == ("127.0.0.1", "default")
    assert rows["TELEMETRY_S3_BUCKET"] == ("restartix-telemetry-prod", "derived")
    assert rows["TELEMETRY_JWT_SIGNING_KID"] == ("dev-1", "derived")


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u@h/db?sslmode=require&password=pw",
     "postgresql://u@h/db?sslmode=require&password=***"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("http://[::1/x", "(not a URL, hidden)"),
    ("postgresql://u@h/db?sslpassword=pw", "postgresql://u@h/db?sslpassword=***"),
    ("NATS://u:pw@h:4222", "NATS://u:***@h:4222"),  # the scheme as written
    # libpq's keyword notation, which psycopg takes as DATABASE_URL too
    ("host=db user=u password=pw dbname=t", "host=db user=u password=*** dbname=t"),
    ("host=db password = 'p w \\' x' port=5", "host=db password = *** port=5"),
    ("password='pw unterminated", "password=***"),
    ("host=db PASSWORD=pw sslpassword=pw", "host=db PASSWORD=*** sslpassword=***"),
    ("password=p\\ w host=db", "password=*** host=db"),
    # neither a URL nor keywords: user:pw@host without a scheme has no URL password
    ("u:pw@h:4222", "(not a URL, hidden)"),
])
def test_passwords_in_urls_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
