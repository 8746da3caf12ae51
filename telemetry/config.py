"""Service configuration: one frozen object, loaded once from the environment.

Every variable is documented in ``docs/configuration.md`` (and the README table);
:data:`VARIABLES` is the single source both are checked against by a test.

``Settings.from_env`` raises :class:`ConfigError` naming the variable and the
problem for any value it cannot parse, so a bad deployment fails at start-up
rather than on the first request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telemetry.asgi import Network, parse_networks

# The development keyset: used only when TELEMETRY_JWT_KEYS is unset, so the demo and
# tests run with zero configuration. Production sets TELEMETRY_JWT_KEYS from Secrets
# Manager; ``telemetry serve`` logs a warning when it runs on the development keys.
DEV_KEYS: dict[str, str] = {"dev-1": "restartix-telemetry-development-secret-not-for-production"}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# name -> (default shown in docs, description)
VARIABLES: dict[str, tuple[str, str]] = {
    "TELEMETRY_HOST": ("127.0.0.1", "Address the HTTP server binds."),
    "TELEMETRY_PORT": ("8080", "Port the HTTP server binds (0 = any free port)."),
    "TELEMETRY_DATA_DIR": (".telemetry-data", "Root for embedded state: blobs, Postgres."),
    "TELEMETRY_ENV": ("dev", "Environment name; the S3 bucket defaults to "
                      "`restartix-telemetry-{env}`."),
    "TELEMETRY_JWT_KEYS": ("(development key)", "JSON object `{kid: secret}` of HMAC keys "
                           "accepted for tokens; several kids allow rotation."),
    "TELEMETRY_JWT_SIGNING_KID": ("first kid", "Kid the `telemetry token` tool signs with."),
    "TELEMETRY_JWT_ALGORITHMS": ("HS256", "Comma-separated allowlist of JWT algorithms; "
                                 "never taken from the token."),
    "TELEMETRY_JWT_ISSUER": ("restartix-core-api", "Required `iss` of every token."),
    "TELEMETRY_JWT_AUDIENCE": ("restartix-telemetry", "Required `aud` of session tokens."),
    "TELEMETRY_ADMIN_AUDIENCE": ("restartix-telemetry-admin", "Required `aud` of "
                                 "service-account tokens for the admin endpoints."),
    "TELEMETRY_JWT_LEEWAY_S": ("30", "Clock leeway for `exp`/`iat`/`nbf`, seconds."),
    "TELEMETRY_JWT_MAX_LIFETIME_S": ("14400", "Tokens whose `exp - iat` exceeds this are "
                                     "rejected even if unexpired."),
    "TELEMETRY_MAX_BODY_BYTES": ("262144", "Cap on a request body; larger gets 413 before "
                                 "the body is read."),
    "TELEMETRY_BODY_TIMEOUT_S": ("30", "How long a request body (pose or media POST) may "
                                 "take to arrive once its headers are in; a slower one is "
                                 "answered 408 `body_timeout` and its connection closed."),
    "TELEMETRY_MAX_FRAMES_PER_BATCH": ("120", "Cap on frames in one pose batch (400 above)."),
    "TELEMETRY_MAX_EVENTS_PER_BATCH": ("500", "Cap on events in one media batch (400 above)."),
    "TELEMETRY_MAILBOX_SIZE": ("16", "Batches a session actor may have queued; a full "
                               "mailbox answers 503 with Retry-After."),
    "TELEMETRY_REORDER_WINDOW": ("8", "How far ahead of the next expected sequence number a "
                                 "batch may arrive and be held for reordering."),
    "TELEMETRY_GAP_TIMEOUT_S": ("10", "How long a missing batch is waited for before the "
                                "session skips it and applies what it holds."),
    "TELEMETRY_IDLE_TIMEOUT_S": ("60", "A session with no batch for this long is ended "
                                 "(end reason `idle_timeout`)."),
    "TELEMETRY_MAX_SESSION_S": ("7200", "A session is ended at this age "
                                "(end reason `max_duration`)."),
    "TELEMETRY_ENDED_RETENTION_S": ("3600", "How long an ended session's summary is kept to "
                                    "answer repeated end calls and 409 late frames."),
    "TELEMETRY_SHUTDOWN_DEADLINE_S": ("25", "On shutdown, time allowed to finalise live "
                                      "sessions; must stay below the orchestrator's stop "
                                      "timeout."),
    "TELEMETRY_MAX_LIVE_SESSIONS": ("5000", "Live sessions per process; a new session "
                                    "beyond it gets 429 with Retry-After."),
    "TELEMETRY_MAX_SESSIONS_PER_ORG": ("1000", "Live sessions per organisation per process "
                                       "(429 beyond)."),
    "TELEMETRY_MAX_BATCHES_PER_S": ("5", "Pose batches per second per session (token "
                                    "bucket, burst 2x; 429 beyond)."),
    "TELEMETRY_SPOOL_MAX_BYTES": ("2147483648", "Disk budget of the spool; past it new "
                                  "batches get 503 with Retry-After."),
    "TELEMETRY_SPOOL": ("on", "`off` acknowledges from memory (no durability): only to "
                        "measure what the spool costs."),
    "TELEMETRY_SPOOL_FSYNC_MS": ("0", "Minimum time between fsync rounds; 0 = a round "
                                 "starts as soon as there is work (what arrives during a "
                                 "round is committed together in the next)."),
    "TELEMETRY_SHUTDOWN_MODE": ("flush", "On SIGTERM: `flush` (leave live sessions in the "
                                "spool for the next start) or `finalise` (end them)."),
    "TELEMETRY_CORS_ORIGINS": ("(none)", "Comma-separated browser origins (the Patient "
                               "Portal's) allowed to call the API cross-origin."),
    "TELEMETRY_TRUSTED_PROXIES": ("(none)", "Comma-separated CIDRs of the proxies in front "
                                  "(router, load balancer) whose `X-Forwarded-For` is "
                                  "believed for the client address; none trusts no header."),
    "TELEMETRY_TLS_CERT": ("(none)", "PEM certificate chain; with TELEMETRY_TLS_KEY the "
                           "service terminates TLS itself (1.2+) and sends HSTS."),
    "TELEMETRY_TLS_KEY": ("(none)", "PEM private key for TELEMETRY_TLS_CERT."),
    "TELEMETRY_JWT_KEYS_FILE": ("(none)", "JSON file with the keyset (same shape as "
                                "TELEMETRY_JWT_KEYS); reloaded on SIGHUP or change."),
    "TELEMETRY_JWT_PUBLIC_KEYS": ("(none)", "JSON `{kid: PEM public key}` for EdDSA/ES256 "
                                  "tokens, alongside the HMAC keys."),
    "TELEMETRY_BLOB_ENCODING": ("(replay default)", "Replay blob encoding; see "
                                "docs/replay-format.md."),
    "TELEMETRY_BLOB_STORE": ("fs", "`fs` (files under the data dir) or `s3`."),
    "TELEMETRY_S3_BUCKET": ("restartix-telemetry-{env}", "S3 bucket for replay blobs."),
    "TELEMETRY_S3_PREFIX": ("(none)", "Key prefix inside the bucket."),
    "TELEMETRY_S3_REGION": ("(boto3 default)", "AWS region of the bucket."),
    "TELEMETRY_S3_ENDPOINT_URL": ("(AWS)", "S3-compatible endpoint (tests, MinIO, VPC "
                                  "endpoint)."),
    "TELEMETRY_S3_KMS_KEY_ID": ("(none: SSE-S3)", "KMS key for server-side encryption."),
    "TELEMETRY_BUS": ("inprocess", "`inprocess` (embedded sink writes Postgres here) or "
                      "`http` (POST to the Core API's internal endpoint)."),
    "TELEMETRY_BUS_URL": ("(none)", "Core API internal events endpoint, for `http`."),
    "TELEMETRY_BUS_TOKEN": ("(minted)", "Service-account token for the bus; when unset, "
                            "one is minted from the keyset with scope `telemetry:sink`."),
    "TELEMETRY_SINK": ("embedded", "`embedded`: run the aggregate sink in-process "
                       "(Postgres); `none`: publish only."),
    "TELEMETRY_SINK_HOST": ("127.0.0.1", "Bind address of `telemetry sink`."),
    "TELEMETRY_SINK_PORT": ("8081", "Port of `telemetry sink`."),
    "TELEMETRY_SINK_DATABASE_URL": ("(derived)", "The sink role's own Postgres URL; default: "
                                    "DATABASE_URL with the user `telemetry_sink`, no password."),
    "DATABASE_URL": ("(embedded pgserver)", "Postgres for the sink; when unset an embedded "
                     "server is started in the data dir."),
    "TELEMETRY_LOG_LEVEL": ("INFO", "Log level."),
    "TELEMETRY_PSEUDONYM_KEY": ("(random per process)", "HMAC key for patient pseudonyms "
                                "in logs."),
}


def markdown_table() -> str:
    """The README's configuration table (regenerate with ``python -m telemetry.config``)."""
    rows = [f"| `{k}` | {d} | {desc} |" for k, (d, desc) in VARIABLES.items()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


class ConfigError(ValueError):
    """A configuration variable is missing or malformed; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def _keys(env: Mapping[str, str]) -> dict[str, str]:
    raw = env.get("TELEMETRY_JWT_KEYS")
    if not raw:
        return dict(DEV_KEYS)
    try:
        keys: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TELEMETRY_JWT_KEYS is not valid JSON: {exc.msg}") from None
    if (
        not isinstance(keys, dict)
        or not keys
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in keys.items())
    ):
        raise ConfigError("TELEMETRY_JWT_KEYS must be a non-empty JSON object {kid: secret}")
    short = [k for k, v in keys.items() if len(v.encode()) < 32]
    if short:
        # RFC 7518 3.2: an HMAC key must be at least as long as the hash output.
        raise ConfigError(f"TELEMETRY_JWT_KEYS: keys {short} are shorter than 32 bytes")
    return keys


def _cors(env: Mapping[str, str]) -> tuple[str, ...]:
    from telemetry.cors import CorsConfigError, parse_origins

    try:
        return parse_origins(env.get("TELEMETRY_CORS_ORIGINS", ""))
    except CorsConfigError as exc:
        raise ConfigError(f"TELEMETRY_CORS_ORIGINS: {exc}") from None


def _trusted_proxies(env: Mapping[str, str]) -> tuple[Network, ...]:
    try:
        return parse_networks(env.get("TELEMETRY_TRUSTED_PROXIES", ""))
    except ValueError as exc:
        raise ConfigError(f"TELEMETRY_TRUSTED_PROXIES: {exc}") from None


def _public_keys(env: Mapping[str, str]) -> dict[str, str]:
    raw = env.get("TELEMETRY_JWT_PUBLIC_KEYS")
    if not raw:
        return {}
    try:
        keys: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TELEMETRY_JWT_PUBLIC_KEYS is not valid JSON: {exc.msg}") from None
    if not isinstance(keys, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "PUBLIC KEY" in v for k, v in keys.items()
    ):
        raise ConfigError("TELEMETRY_JWT_PUBLIC_KEYS must be a JSON object {kid: PEM public key}")
    return keys


@dataclass(frozen=True)
class Settings:
    """The service's whole configuration. Build with :meth:`from_env` or directly in tests."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".telemetry-data")
    env: str = "dev"
    jwt_keys: Mapping[str, str] = field(default_factory=lambda: dict(DEV_KEYS))
    jwt_signing_kid: str = "dev-1"
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_issuer: str = "restartix-core-api"
    jwt_audience: str = "restartix-telemetry"
    admin_audience: str = "restartix-telemetry-admin"
    jwt_leeway_s: float = 30.0
    jwt_max_lifetime_s: float = 4 * 3600.0
    max_body_bytes: int = 256 * 1024
    body_timeout_s: float = 30.0
    max_frames_per_batch: int = 120
    max_events_per_batch: int = 500
    mailbox_size: int = 16
    max_live_sessions: int = 5000
    max_sessions_per_org: int = 1000
    max_batches_per_s: float = 5.0
    spool_max_bytes: int = 2 * 1024**3
    spool_fsync_ms: float = 0.0
    spool_enabled: bool = True
    shutdown_mode: str = "flush"
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    jwt_keys_file: Path | None = None
    jwt_public_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    reorder_window: int = 8
    gap_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_session_s: float = 7200.0
    ended_retention_s: float = 3600.0
    shutdown_deadline_s: float = 25.0
    blob_encoding: str | None = None
    blob_store: str = "fs"
    s3_bucket: str = "restartix-telemetry-dev"
    s3_prefix: str = ""
    s3_region: str | None = None
    s3_endpoint_url: str | None = None
    s3_kms_key_id: str | None = None
    bus: str = "inprocess"
    bus_url: str | None = None
    bus_token: str | None = field(default=None, repr=False)
    sink: str = "embedded"
    sink_host: str = "127.0.0.1"
    sink_port: int = 8081
    database_url: str | None = field(default=None, repr=False)
    sink_database_url: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    pseudonym_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    @property
    def uses_dev_keys(self) -> bool:
        # A keys file replaces TELEMETRY_JWT_KEYS for verification (telemetry.auth).
        return self.jwt_keys_file is None and dict(self.jwt_keys) == DEV_KEYS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TELEMETRY_*`` variable; unknown ones are ignored, bad ones raise."""
        env = os.environ if env is None else env
        keys = _keys(env)
        signing = env.get("TELEMETRY_JWT_SIGNING_KID") or next(iter(keys))
        if signing not in keys and not env.get("TELEMETRY_JWT_KEYS_FILE"):
            raise ConfigError(f"TELEMETRY_JWT_SIGNING_KID={signing!r} is not in TELEMETRY_JWT_KEYS")
        algs = tuple(
            a.strip() for a in env.get("TELEMETRY_JWT_ALGORITHMS", "HS256").split(",") if a.strip()
        )
        allowed = {"HS256", "HS384", "HS512", "ES256", "EdDSA"}
        if not algs or not set(algs) <= allowed:
            raise ConfigError(
                f"TELEMETRY_JWT_ALGORITHMS={','.join(algs)!r}: only {sorted(allowed)} are supported"
            )
        pkey = env.get("TELEMETRY_PSEUDONYM_KEY")
        deploy_env = env.get("TELEMETRY_ENV", "dev")
        choices = {"TELEMETRY_BLOB_STORE": ("fs", "s3"), "TELEMETRY_BUS": ("inprocess", "http"),
                   "TELEMETRY_SINK": ("embedded", "none"),
                   "TELEMETRY_SHUTDOWN_MODE": ("flush", "finalise"),
                   "TELEMETRY_SPOOL": ("on", "off")}
        for name, allowed_values in choices.items():
            if env.get(name, allowed_values[0]) not in allowed_values:
                raise ConfigError(f"{name}={env[name]!r}: must be one of {allowed_values}")
        if bool(env.get("TELEMETRY_TLS_CERT")) != bool(env.get("TELEMETRY_TLS_KEY")):
            raise ConfigError("TELEMETRY_TLS_CERT and TELEMETRY_TLS_KEY go together")
        if env.get("TELEMETRY_BUS") == "http" and not env.get("TELEMETRY_BUS_URL"):
            raise ConfigError("TELEMETRY_BUS=http needs TELEMETRY_BUS_URL")
        level = env.get("TELEMETRY_LOG_LEVEL", "INFO").upper()
        if level not in LOG_LEVELS:
            # Found here, not by logging.setLevel after the log is set up.
            raise ConfigError(f"TELEMETRY_LOG_LEVEL={level[:20]!r}: must be one of {LOG_LEVELS}")
        return cls(
            host=env.get("TELEMETRY_HOST", "127.0.0.1"),
            port=_int(env, "TELEMETRY_PORT", 8080),
            data_dir=Path(env.get("TELEMETRY_DATA_DIR", ".telemetry-data")),
            env=deploy_env,
            jwt_keys=keys,
            jwt_signing_kid=signing,
            jwt_algorithms=algs,
            jwt_issuer=env.get("TELEMETRY_JWT_ISSUER", "restartix-core-api"),
            jwt_audience=env.get("TELEMETRY_JWT_AUDIENCE", "restartix-telemetry"),
            admin_audience=env.get("TELEMETRY_ADMIN_AUDIENCE", "restartix-telemetry-admin"),
            jwt_leeway_s=_float(env, "TELEMETRY_JWT_LEEWAY_S", 30.0),
            jwt_max_lifetime_s=_float(env, "TELEMETRY_JWT_MAX_LIFETIME_S", 14400.0, 1.0),
            max_body_bytes=_int(env, "TELEMETRY_MAX_BODY_BYTES", 256 * 1024, 1024),
            body_timeout_s=_float(env, "TELEMETRY_BODY_TIMEOUT_S", 30.0, 0.1),
            max_frames_per_batch=_int(env, "TELEMETRY_MAX_FRAMES_PER_BATCH", 120, 1),
            max_events_per_batch=_int(env, "TELEMETRY_MAX_EVENTS_PER_BATCH", 500, 1),
            max_live_sessions=_int(env, "TELEMETRY_MAX_LIVE_SESSIONS", 5000, 1),
            max_sessions_per_org=_int(env, "TELEMETRY_MAX_SESSIONS_PER_ORG", 1000, 1),
            max_batches_per_s=_float(env, "TELEMETRY_MAX_BATCHES_PER_S", 5.0, 0.1),
            spool_max_bytes=_int(env, "TELEMETRY_SPOOL_MAX_BYTES", 2 * 1024**3, 1024),
            spool_fsync_ms=_float(env, "TELEMETRY_SPOOL_FSYNC_MS", 0.0, 0.0),
            spool_enabled=env.get("TELEMETRY_SPOOL", "on") == "on",
            shutdown_mode=env.get("TELEMETRY_SHUTDOWN_MODE", "flush"),
            cors_origins=_cors(env),
            trusted_proxies=_trusted_proxies(env),
            tls_cert=Path(env["TELEMETRY_TLS_CERT"]) if env.get("TELEMETRY_TLS_CERT") else None,
            tls_key=Path(env["TELEMETRY_TLS_KEY"]) if env.get("TELEMETRY_TLS_KEY") else None,
            jwt_keys_file=(Path(env["TELEMETRY_JWT_KEYS_FILE"])
                           if env.get("TELEMETRY_JWT_KEYS_FILE") else None),
            jwt_public_keys=_public_keys(env),
            mailbox_size=_int(env, "TELEMETRY_MAILBOX_SIZE", 16, 1),
            reorder_window=_int(env, "TELEMETRY_REORDER_WINDOW", 8, 0),
            gap_timeout_s=_float(env, "TELEMETRY_GAP_TIMEOUT_S", 10.0, 0.1),
            idle_timeout_s=_float(env, "TELEMETRY_IDLE_TIMEOUT_S", 60.0, 0.1),
            max_session_s=_float(env, "TELEMETRY_MAX_SESSION_S", 7200.0, 1.0),
            ended_retention_s=_float(env, "TELEMETRY_ENDED_RETENTION_S", 3600.0, 1.0),
            shutdown_deadline_s=_float(env, "TELEMETRY_SHUTDOWN_DEADLINE_S", 25.0, 0.1),
            blob_encoding=env.get("TELEMETRY_BLOB_ENCODING") or None,
            blob_store=env.get("TELEMETRY_BLOB_STORE", "fs"),
            s3_bucket=env.get("TELEMETRY_S3_BUCKET") or f"restartix-telemetry-{deploy_env}",
            s3_prefix=env.get("TELEMETRY_S3_PREFIX", ""),
            s3_region=env.get("TELEMETRY_S3_REGION") or None,
            s3_endpoint_url=env.get("TELEMETRY_S3_ENDPOINT_URL") or None,
            s3_kms_key_id=env.get("TELEMETRY_S3_KMS_KEY_ID") or None,
            bus=env.get("TELEMETRY_BUS", "inprocess"),
            bus_url=env.get("TELEMETRY_BUS_URL") or None,
            bus_token=env.get("TELEMETRY_BUS_TOKEN") or None,
            sink=env.get("TELEMETRY_SINK", "embedded"),
            sink_host=env.get("TELEMETRY_SINK_HOST", "127.0.0.1"),
            sink_port=_int(env, "TELEMETRY_SINK_PORT", 8081),
            database_url=env.get("DATABASE_URL") or None,
            sink_database_url=env.get("TELEMETRY_SINK_DATABASE_URL") or None,
            log_level=level,
            pseudonym_key=pkey.encode() if pkey else os.urandom(32),
        )


if __name__ == "__main__":
    print(markdown_table())
