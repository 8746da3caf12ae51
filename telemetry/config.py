"""Service configuration: one frozen object, loaded once from the environment.

Each setting is declared once, as a field of :class:`Settings`::

    idle_timeout_s: float = setting(
        "TELEMETRY_IDLE_TIMEOUT_S", 60.0, parse=number, check=AtLeast(0.1),
        doc="A session with no batch for this long is ended ...")

The field gives the attribute's name, type and default; :func:`setting` adds the
variable, the doc and the bounds (telemetry/config_spec.py). From that one declaration
come :meth:`Settings.from_env`, the bounds check of every ``Settings`` however it was
built, :data:`VARIABLES`, the README table, ``docs/configuration.md`` and
``telemetry config`` (telemetry/config_report.py).

**Adding a setting** is a one-place edit: add its field below, in the group it belongs
to, then run ``python -m telemetry.config_report --write`` to regenerate the README table and
``docs/configuration.md`` (a test fails until you do). Numbers and optional values have
shorthands; for example hypercorn's graceful timeout would be::

    graceful_timeout_s: float = _seconds('TELEMETRY_GRACEFUL_TIMEOUT_S', 5.0, 0.0,
                                         'Time hypercorn gives open connections ...')

A rule linking two variables goes in :func:`_cross_checks`. A variable read elsewhere
(not a setting) is listed in ``OTHER_VARIABLES`` (telemetry/config_report.py) so that
``telemetry config --check`` does not call it a typo.

Errors: ``Settings.from_env`` raises :class:`ConfigError` naming the variable and the
problem for any value it cannot parse, so a bad deployment fails at start-up rather than
on the first request; ``Settings(...)`` built directly raises it for a value out of its
bounds. Unknown ``TELEMETRY_*`` variables are ignored here; ``telemetry config --check``
names them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.replay_codec import ENCODINGS
from telemetry.asgi import Network, parse_networks
from telemetry.config_spec import (
    AtLeast,
    Between,
    ConfigError,
    MinBytes,
    OneOf,
    SafeId,
    SubsetOf,
    integer,
    load,
    masked_url,
    number,
    path,
    setting,
    specs,
    validate,
)

__all__ = ["DEV_KEYS", "LOG_LEVELS", "VARIABLES", "ConfigError", "Settings", "markdown_table"]

# The development keyset: used only when TELEMETRY_JWT_KEYS is unset, so the demo and
# tests run with zero configuration. Production sets TELEMETRY_JWT_KEYS from Secrets
# Manager; ``telemetry serve`` logs a warning when it runs on the development keys.
DEV_KEYS: dict[str, str] = {"dev-1": "restartix-telemetry-development-secret-not-for-production"}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
JWT_ALGORITHMS = frozenset({"HS256", "HS384", "HS512", "ES256", "EdDSA"})


def _keys(name: str, raw: str) -> dict[str, str]:
    try:
        keys: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc.msg}") from None
    if (
        not isinstance(keys, dict)
        or not keys
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in keys.items())
    ):
        raise ConfigError(f"{name} must be a non-empty JSON object {{kid: secret}}")
    short = [k for k, v in keys.items() if len(v.encode()) < 32]
    if short:
        # RFC 7518 3.2: an HMAC key must be at least as long as the hash output.
        raise ConfigError(f"{name}: keys {short} are shorter than 32 bytes")
    return keys


def _public_keys(name: str, raw: str) -> dict[str, str]:
    try:
        keys: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc.msg}") from None
    if not isinstance(keys, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "PUBLIC KEY" in v for k, v in keys.items()
    ):
        raise ConfigError(f"{name} must be a JSON object {{kid: PEM public key}}")
    return keys


def _algorithms(name: str, raw: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in raw.split(",") if a.strip())


def _cors(name: str, raw: str) -> tuple[str, ...]:
    from telemetry.cors import CorsConfigError, parse_origins  # cors imports this module

    try:
        return parse_origins(raw)
    except CorsConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _networks(name: str, raw: str) -> tuple[Network, ...]:
    try:
        return parse_networks(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _urls(name: str, raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in raw.split(",") if u.strip())
    bad = [u for u in urls if not u.startswith(("nats://", "tls://"))]
    if bad:
        # Masked: a URL may hold credentials, and this message is logged (logs.fatal).
        raise ConfigError(f"{name}: not a nats:// or tls:// URL: "
                          f"{', '.join(masked_url(u) for u in bad)}")
    return urls


def _on_off(name: str, raw: str) -> bool:
    OneOf(("on", "off"))(name, raw)
    return raw == "on"


def _upper_level(name: str, raw: str) -> str:
    return raw.upper()


def _secret_bytes(name: str, raw: str) -> bytes:
    return raw.encode()


def _kids(keys: Mapping[str, str]) -> str:
    return f"kids {', '.join(keys)} (secrets hidden)"


def _optional(**kw: Any) -> Any:
    """An optional text or path setting: unset or empty means ``None``."""
    return setting(default=None, blank_is_unset=True, **kw)


def _bounds(minimum: float, maximum: float | None) -> AtLeast:
    return AtLeast(minimum) if maximum is None else Between(minimum, maximum)


def _count(env: str, default: int, minimum: int, doc: str, maximum: int | None = None) -> Any:
    return setting(env, default, parse=integer, check=_bounds(minimum, maximum),
                   blank_is_unset=True, doc=doc)


def _seconds(env: str, default: float, minimum: float, doc: str,
             maximum: float | None = None) -> Any:
    return setting(env, default, parse=number, check=_bounds(minimum, maximum),
                   blank_is_unset=True, doc=doc)


# TCP's port field is 16 bits; a larger number would fail only when the server binds.
MAX_PORT = 65535
# Upper bounds of the token time rules (docs/security.md): larger values would not loosen
# them but switch them off (a leeway of days accepts long-expired tokens; a lifetime of
# years makes the wait of a key rotation, and a stolen token's use, unbounded).
MAX_JWT_LEEWAY_S = 300.0
MAX_JWT_LIFETIME_S = 24 * 3600.0
# The same floor as an HMAC JWT key (RFC 7518 3.2): the pseudonym key is an HMAC-SHA256
# key, and a short one lets anyone holding the logs brute-force it and link pseudonyms
# back to patient ids.
MIN_PSEUDONYM_KEY_BYTES = 32


@dataclass(frozen=True)
class Settings:
    """The service's whole configuration. Build with :meth:`from_env` or directly in tests;
    either way a value out of its bounds raises :class:`ConfigError`."""

    # -- the HTTP server
    host: str = setting("TELEMETRY_HOST", "127.0.0.1", doc="Address the HTTP server binds.")
    port: int = _count("TELEMETRY_PORT", 8080, 0,
                       "Port the HTTP server binds (0 = any free port).", MAX_PORT)
    data_dir: Path = setting("TELEMETRY_DATA_DIR", Path(".telemetry-data"), parse=path,
                             doc="Root for embedded state: blobs, Postgres.")
    env: str = setting("TELEMETRY_ENV", "dev", doc="Environment name; the S3 bucket defaults "
                       "to `restartix-telemetry-{env}`.")
    # -- tokens
    jwt_keys: Mapping[str, str] = setting(
        "TELEMETRY_JWT_KEYS", factory=lambda: dict(DEV_KEYS), shown="(development key)",
        parse=_keys, blank_is_unset=True, secret=True, show=_kids,
        allowed="JSON; secrets >= 32 bytes",
        doc="JSON object `{kid: secret}` of HMAC keys accepted for tokens; several kids "
            "allow rotation.")
    jwt_signing_kid: str = setting(
        "TELEMETRY_JWT_SIGNING_KID", "dev-1", shown="first kid", blank_is_unset=True,
        derive=lambda get: next(iter(get("jwt_keys"))),
        doc="Kid the `telemetry token` tool signs with.")
    jwt_algorithms: tuple[str, ...] = setting(
        "TELEMETRY_JWT_ALGORITHMS", ("HS256",), parse=_algorithms,
        check=SubsetOf(JWT_ALGORITHMS),
        doc="Comma-separated allowlist of JWT algorithms; never taken from the token.")
    jwt_issuer: str = setting("TELEMETRY_JWT_ISSUER", "restartix-core-api",
                              doc="Required `iss` of every token.")
    jwt_audience: str = setting("TELEMETRY_JWT_AUDIENCE", "restartix-telemetry",
                                doc="Required `aud` of session tokens.")
    admin_audience: str = setting("TELEMETRY_ADMIN_AUDIENCE", "restartix-telemetry-admin",
                                  doc="Required `aud` of service-account tokens for the admin "
                                      "endpoints.")
    jwt_leeway_s: float = _seconds("TELEMETRY_JWT_LEEWAY_S", 30.0, 0.0,
                                   "Clock leeway for `exp`/`iat`/`nbf`, seconds.",
                                   MAX_JWT_LEEWAY_S)
    jwt_max_lifetime_s: float = _seconds("TELEMETRY_JWT_MAX_LIFETIME_S", 4 * 3600.0, 1.0,
                                         "Tokens whose `exp - iat` exceeds this are rejected "
                                         "even if unexpired.", MAX_JWT_LIFETIME_S)
    # -- requests
    max_body_bytes: int = _count("TELEMETRY_MAX_BODY_BYTES", 256 * 1024, 1024,
                                 "Cap on a request body; larger gets 413 before the body is "
                                 "read.")
    body_timeout_s: float = _seconds("TELEMETRY_BODY_TIMEOUT_S", 30.0, 0.1,
                                     "How long a request body (pose or media POST) may take "
                                     "to arrive once its headers are in; a slower one is "
                                     "answered 408 `body_timeout` and its connection closed.")
    max_frames_per_batch: int = _count("TELEMETRY_MAX_FRAMES_PER_BATCH", 120, 1,
                                       "Cap on frames in one pose batch (400 above).")
    max_events_per_batch: int = _count("TELEMETRY_MAX_EVENTS_PER_BATCH", 500, 1,
                                       "Cap on events in one media batch (400 above).")
    # -- sessions
    mailbox_size: int = _count("TELEMETRY_MAILBOX_SIZE", 16, 1,
                               "Batches a session actor may have queued; a full mailbox "
                               "answers 503 with Retry-After.")
    reorder_window: int = _count("TELEMETRY_REORDER_WINDOW", 8, 0,
                                 "How far ahead of the next expected sequence number a batch "
                                 "may arrive and be held for reordering.")
    gap_timeout_s: float = _seconds("TELEMETRY_GAP_TIMEOUT_S", 10.0, 0.1,
                                    "How long a missing batch is waited for before the "
                                    "session skips it and applies what it holds.")
    idle_timeout_s: float = _seconds("TELEMETRY_IDLE_TIMEOUT_S", 60.0, 0.1,
                                     "A session with no batch for this long is ended "
                                     "(end reason `idle_timeout`).")
    max_session_s: float = _seconds("TELEMETRY_MAX_SESSION_S", 7200.0, 1.0,
                                    "A session is ended at this age (end reason "
                                    "`max_duration`).")
    ended_retention_s: float = _seconds("TELEMETRY_ENDED_RETENTION_S", 3600.0, 1.0,
                                        "How long an ended session's summary is kept to "
                                        "answer repeated end calls and 409 late frames.")
    shutdown_deadline_s: float = _seconds("TELEMETRY_SHUTDOWN_DEADLINE_S", 25.0, 0.1,
                                          "On shutdown, time allowed to finalise live "
                                          "sessions; must stay below the orchestrator's stop "
                                          "timeout.")
    max_live_sessions: int = _count("TELEMETRY_MAX_LIVE_SESSIONS", 5000, 1,
                                    "Live sessions per process; a new session beyond it gets "
                                    "429 with Retry-After.")
    max_sessions_per_org: int = _count("TELEMETRY_MAX_SESSIONS_PER_ORG", 1000, 1,
                                       "Live sessions per organisation per process (429 "
                                       "beyond).")
    max_batches_per_s: float = _seconds("TELEMETRY_MAX_BATCHES_PER_S", 5.0, 0.1,
                                        "Pose batches per second per session (token bucket, "
                                        "burst 2x; 429 beyond).")
    # -- the spool
    spool_max_bytes: int = _count("TELEMETRY_SPOOL_MAX_BYTES", 2 * 1024**3, 1024,
                                  "Disk budget of the spool; past it new batches get 503 "
                                  "with Retry-After.")
    spool_enabled: bool = setting(
        "TELEMETRY_SPOOL", True, shown="on", parse=_on_off, allowed="one of `on`, `off`",
        show=lambda on: "on" if on else "off",
        doc="`off` acknowledges from memory (no durability): only to measure what the spool "
            "costs.")
    spool_fsync_ms: float = _seconds("TELEMETRY_SPOOL_FSYNC_MS", 0.0, 0.0,
                                     "Minimum time between fsync rounds; 0 = a round starts "
                                     "as soon as there is work (what arrives during a round "
                                     "is committed together in the next).")
    # -- the journal: where acknowledged batches are kept (docs/durability.md, docs/fleet.md)
    journal: str = setting(
        "TELEMETRY_JOURNAL", "spool", check=OneOf(("spool", "jetstream")),
        doc="`spool` (local disk, this instance only) or `jetstream` (a replicated stream "
            "on the NATS cluster at TELEMETRY_NATS_URLS; see docs/fleet.md).")
    # Secret for the credentials a URL may hold (nats://user:pw@host): printed masked.
    nats_urls: tuple[str, ...] = setting(
        "TELEMETRY_NATS_URLS", (), shown="(none)", parse=_urls, allowed="`nats://host:port`, ...",
        secret=True, show=lambda urls: ",".join(masked_url(u) for u in urls) or "(none)",
        doc="Comma-separated NATS servers of the JetStream cluster, for "
            "`TELEMETRY_JOURNAL=jetstream`.")
    journal_replicas: int = _count("TELEMETRY_JOURNAL_REPLICAS", 3, 1,
                                   "Replication factor of the JetStream journal's stream and "
                                   "state bucket; a batch is acknowledged once a majority "
                                   "holds it.")
    shutdown_mode: str = setting(
        "TELEMETRY_SHUTDOWN_MODE", "flush", check=OneOf(("flush", "finalise")),
        doc="On SIGTERM: `flush` (leave live sessions in the journal: the next start, or in "
            "fleet mode any instance, carries them on) or `finalise` (end them).")
    # -- fleet mode (TELEMETRY_JOURNAL=jetstream): session ownership, docs/fleet.md
    instance_id: str = setting(
        "TELEMETRY_INSTANCE_ID", "", shown="(random per start)", blank_is_unset=True,
        check=SafeId(), allowed="a safe id (`[A-Za-z0-9_.-]`, 1-128)",
        doc="This instance's name in the fleet's ownership records; unset: a random one "
            "per start (a restarted instance is a new owner).")
    lease_s: float = _seconds("TELEMETRY_LEASE_S", 10.0, 1.0,
                              "Fleet mode: an instance's lease; its heartbeat is renewed "
                              "every third of it, and its sessions are orphans once it "
                              "expires.")
    orphan_grace_s: float = _seconds("TELEMETRY_ORPHAN_GRACE_S", 30.0, 0.0,
                                     "Fleet mode: how long a session released at "
                                     "passivation waits for its client before another "
                                     "instance claims it (then it ends by idle timeout if "
                                     "nobody resumes it).")
    # -- the network in front
    cors_origins: tuple[str, ...] = setting(
        "TELEMETRY_CORS_ORIGINS", (), parse=_cors, allowed="`scheme://host[:port]`, ...",
        doc="Comma-separated browser origins (the Patient Portal's) allowed to call the API "
            "cross-origin.")
    trusted_proxies: tuple[Network, ...] = setting(
        "TELEMETRY_TRUSTED_PROXIES", (), parse=_networks, allowed="CIDRs",
        doc="Comma-separated CIDRs of the proxies in front (router, load balancer) whose "
            "`X-Forwarded-For` is believed for the client address; none trusts no header.")
    tls_cert: Path | None = _optional(
        env="TELEMETRY_TLS_CERT", parse=path,
        doc="PEM certificate chain; with TELEMETRY_TLS_KEY the service terminates TLS itself "
            "(1.2+) and sends HSTS.")
    tls_key: Path | None = _optional(env="TELEMETRY_TLS_KEY", parse=path,
                                     doc="PEM private key for TELEMETRY_TLS_CERT.")
    jwt_keys_file: Path | None = _optional(
        env="TELEMETRY_JWT_KEYS_FILE", parse=path,
        doc="JSON file with the keyset (same shape as TELEMETRY_JWT_KEYS); reloaded on SIGHUP "
            "or change.")
    jwt_public_keys: Mapping[str, str] = setting(
        "TELEMETRY_JWT_PUBLIC_KEYS", factory=dict, shown="(none)", parse=_public_keys,
        blank_is_unset=True, in_repr=False, allowed="JSON; EC P-256 or Ed25519 keys",
        doc="JSON `{kid: PEM public key}` for EdDSA/ES256 tokens, alongside the HMAC keys.")
    # -- storage
    # Checked here, not only by the replay writer: that runs at a session's first batch,
    # so a typo would pass `config --check` and then answer every session 500.
    blob_encoding: str | None = _optional(env="TELEMETRY_BLOB_ENCODING",
                                          shown="(replay default)",
                                          check=OneOf(ENCODINGS, unset_ok=True),
                                          doc="Replay blob encoding; see docs/replay-format.md.")
    blob_store: str = setting("TELEMETRY_BLOB_STORE", "fs", check=OneOf(("fs", "s3")),
                              doc="`fs` (files under the data dir) or `s3`.")
    s3_bucket: str = setting(
        "TELEMETRY_S3_BUCKET", "restartix-telemetry-dev", shown="restartix-telemetry-{env}",
        blank_is_unset=True, derive=lambda get: f"restartix-telemetry-{get('env')}",
        doc="S3 bucket for replay blobs.")
    s3_prefix: str = setting("TELEMETRY_S3_PREFIX", "", doc="Key prefix inside the bucket.")
    s3_region: str | None = _optional(env="TELEMETRY_S3_REGION", shown="(boto3 default)",
                                      doc="AWS region of the bucket.")
    s3_endpoint_url: str | None = _optional(
        env="TELEMETRY_S3_ENDPOINT_URL", shown="(AWS)",
        doc="S3-compatible endpoint (tests, MinIO, VPC endpoint).")
    s3_kms_key_id: str | None = _optional(env="TELEMETRY_S3_KMS_KEY_ID",
                                          shown="(none: SSE-S3)",
                                          doc="KMS key for server-side encryption.")
    # -- the bus and the sink
    bus: str = setting("TELEMETRY_BUS", "inprocess", check=OneOf(("inprocess", "http")),
                       doc="`inprocess` (embedded sink writes Postgres here) or `http` (POST "
                           "to the Core API's internal endpoint).")
    bus_url: str | None = _optional(env="TELEMETRY_BUS_URL",
                                    doc="Core API internal events endpoint, for `http`.")
    bus_token: str | None = _optional(
        env="TELEMETRY_BUS_TOKEN", shown="(minted)", secret=True,
        doc="Service-account token for the bus; when unset, one is minted from the keyset "
            "with scope `telemetry:sink`.")
    sink: str = setting("TELEMETRY_SINK", "embedded", check=OneOf(("embedded", "none")),
                        doc="`embedded`: run the aggregate sink in-process (Postgres); `none`: "
                            "publish only.")
    sink_host: str = setting("TELEMETRY_SINK_HOST", "127.0.0.1",
                             doc="Bind address of `telemetry sink`.")
    sink_port: int = _count("TELEMETRY_SINK_PORT", 8081, 0, "Port of `telemetry sink`.",
                            MAX_PORT)
    # Secret for the password a URL may hold: `telemetry config` prints it masked.
    sink_database_url: str | None = _optional(
        env="TELEMETRY_SINK_DATABASE_URL", shown="(derived)", secret=True, show=masked_url,
        doc="The sink role's own Postgres URL; default: DATABASE_URL with the user "
            "`telemetry_sink`, no password.")
    database_url: str | None = _optional(
        env="DATABASE_URL", shown="(embedded pgserver)", secret=True, show=masked_url,
        doc="Postgres for the sink; when unset an embedded server is started in the data dir.")
    # -- logs
    log_level: str = setting("TELEMETRY_LOG_LEVEL", "INFO", parse=_upper_level,
                             check=OneOf(LOG_LEVELS),
                             doc="Log level of the service's own loggers; third-party "
                                 "libraries stay at `WARNING` or above (their lower "
                                 "levels print raw ids).")
    pseudonym_key: bytes = setting(
        "TELEMETRY_PSEUDONYM_KEY", factory=lambda: os.urandom(32),
        shown="(random per process)", parse=_secret_bytes, blank_is_unset=True, secret=True,
        check=MinBytes(MIN_PSEUDONYM_KEY_BYTES),
        doc="HMAC key for patient pseudonyms in logs.")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def uses_dev_keys(self) -> bool:
        # A keys file replaces TELEMETRY_JWT_KEYS for verification (telemetry.auth).
        return self.jwt_keys_file is None and dict(self.jwt_keys) == DEV_KEYS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TELEMETRY_*`` variable; unknown ones are ignored, bad ones raise."""
        env = os.environ if env is None else env
        settings = cls(**load(cls, env))
        _cross_checks(settings)
        return settings


def _cross_checks(s: Settings) -> None:
    """Rules that link two variables. Only for a configuration read from the environment:
    a test may build a deliberately partial Settings (a TLS cert alone, a keyset without
    its signing kid) to watch the code that uses it refuse it."""
    if s.jwt_signing_kid not in s.jwt_keys and s.jwt_keys_file is None:
        raise ConfigError(f"TELEMETRY_JWT_SIGNING_KID={s.jwt_signing_kid!r} is not in "
                          "TELEMETRY_JWT_KEYS")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("TELEMETRY_TLS_CERT and TELEMETRY_TLS_KEY go together")
    if s.journal == "jetstream" and not s.nats_urls:
        raise ConfigError("TELEMETRY_JOURNAL=jetstream needs TELEMETRY_NATS_URLS")
    if s.bus == "http" and s.bus_url is None:
        raise ConfigError("TELEMETRY_BUS=http needs TELEMETRY_BUS_URL")


# variable -> (default as the docs show it, description), in declaration order.
VARIABLES: dict[str, tuple[str, str]] = {
    spec.env: (spec.shown, spec.doc) for _, spec in specs(Settings)
}


def markdown_table() -> str:
    """The README's configuration table (``python -m telemetry.config_report --write`` puts it
    there; ``telemetry config --markdown`` prints it)."""
    rows = [f"| `{k}` | {d} | {desc} |" for k, (d, desc) in VARIABLES.items()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])

